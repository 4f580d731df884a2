//! Configuration, read once from the environment (contract section 3). An unknown or malformed
//! value stops start-up with a message naming the variable; `Debug` hides secrets.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use flowcore_store::{BlobConfig, S3Config};

/// Which parts of the topology this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// API and worker in one process (the default).
    All,
    /// Stateless API server.
    Api,
    /// Worker: executes runs from the queue.
    Worker,
}

/// A configuration error, naming the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    /// The variable.
    pub var: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// Every variable the server reads, with its default, for `flowcore serve --help`.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    ("FLOWCORE_BIND", "127.0.0.1:3000", "listen address"),
    (
        "FLOWCORE_ROLE",
        "all",
        "all (api and worker in one process), api, worker",
    ),
    (
        "FLOWCORE_DATA_DIR",
        "./.flowcore",
        "where the embedded defaults keep their files",
    ),
    (
        "DATABASE_URL",
        "sqlite in the data dir",
        "sqlite://... or postgres://...",
    ),
    ("DATABASE_POOL_SIZE", "10", "connections per process"),
    (
        "REDIS_URL",
        "unset: in-process queue and cache",
        "redis://...: shared queue, cache and rate limits",
    ),
    (
        "FLOWCORE_REDIS_PREFIX",
        "flowcore",
        "prefix of every Redis key",
    ),
    ("STORAGE_TYPE", "fs", "fs (in the data dir), s3, memory"),
    ("S3_STORAGE_BUCKET_NAME", "", "S3 bucket"),
    ("S3_STORAGE_REGION", "us-east-1", "S3 region"),
    ("S3_ENDPOINT_URL", "", "S3-compatible endpoint"),
    ("S3_STORAGE_ACCESS_KEY_ID", "", "S3 access key id"),
    ("S3_STORAGE_SECRET_ACCESS_KEY", "", "S3 secret key"),
    (
        "FLOWCORE_ENCRYPTION_KEY",
        "generated once into the data dir (mode 0600)",
        "credentials key",
    ),
    ("FLOWCORE_ADMIN_KEY", "unset", "a bootstrap API key"),
    (
        "WORKER_CONCURRENCY",
        "10",
        "runs one worker executes at once",
    ),
    ("WORKER_GROUP", "default", "the queue a worker takes from"),
    ("FLOW_TIMEOUT_SECONDS", "600", "a run's limit"),
    (
        "WEBHOOK_TIMEOUT_SECONDS",
        "30",
        "how long a sync call waits",
    ),
    ("MAX_PAYLOAD_SIZE_MB", "25", "request body limit"),
    ("MAX_FILE_SIZE_MB", "25", "one file or one step output"),
    ("MAX_RUN_LOG_SIZE_MB", "50", "one run's stored log"),
    (
        "NUMBER_OF_PROXIES",
        "0",
        "trusted proxies in front (X-Forwarded-For depth)",
    ),
    (
        "RATE_LIMIT_PER_MINUTE",
        "0",
        "per client address and per API key (0 = off)",
    ),
    (
        "FLOWCORE_AUTH_FAILURES_PER_MINUTE",
        "30",
        "requests with a missing or wrong API key one client address may make per minute before 429 (0 = off)",
    ),
    (
        "FLOWCORE_MAX_CONNECTIONS",
        "1024",
        "open client connections per process; more wait in the listen backlog",
    ),
    (
        "FLOWCORE_HEADER_TIMEOUT_SECONDS",
        "10",
        "how long a client may take to send a request's headers, and a kept-alive connection may stay idle",
    ),
    (
        "FLOWCORE_IDLE_TIMEOUT_SECONDS",
        "60",
        "the longest pause inside a request body; a webhook's whole body must arrive within it",
    ),
    (
        "FLOWCORE_MAX_QUEUED_RUNS",
        "1000",
        "waited runs waiting for a slot, and runs in a group's queue, before 503 overloaded (0 = no bound)",
    ),
    (
        "FLOWCORE_HTTP_DENY",
        "loopback,link-local,private,unspecified,self",
        "what http_request never reaches: CIDR ranges and those words; a value replaces the default",
    ),
    (
        "FLOWCORE_HTTP_ALLOW",
        "unset",
        "CIDR ranges or host:port that http_request may reach despite FLOWCORE_HTTP_DENY",
    ),
    (
        "FLOWCORE_QUOTA_RUNS_PER_DAY",
        "0",
        "runs one flow may start per UTC day; more get 429 quota_exceeded (0 = off)",
    ),
    (
        "FLOWCORE_SHUTDOWN_GRACE_SECONDS",
        "25",
        "on SIGTERM, how long runs may finish before they are handed back to the queue",
    ),
    (
        "FLOWCORE_LEASE_SECONDS",
        "30",
        "a worker's hold on a run, renewed every third of it; a dead worker's runs move on after it",
    ),
];

/// The server's configuration.
#[derive(Clone)]
pub struct Config {
    /// `FLOWCORE_BIND` (127.0.0.1:3000).
    pub bind: SocketAddr,
    /// `FLOWCORE_ROLE` (all).
    pub role: Role,
    /// `FLOWCORE_DATA_DIR` (./.flowcore).
    pub data_dir: PathBuf,
    /// `DATABASE_URL` (sqlite in the data dir).
    pub database_url: String,
    /// `DATABASE_POOL_SIZE` (10).
    pub database_pool_size: u32,
    /// `REDIS_URL` (unset: in-process queue and cache).
    pub redis_url: Option<String>,
    /// `FLOWCORE_REDIS_PREFIX` (flowcore).
    pub redis_prefix: String,
    /// `STORAGE_TYPE` and the `S3_*` variables (fs in the data dir).
    pub storage: BlobConfig,
    /// `FLOWCORE_ENCRYPTION_KEY` (generated once into the data dir).
    pub encryption_key: Option<String>,
    /// `FLOWCORE_ADMIN_KEY` (unset).
    pub admin_key: Option<String>,
    /// `WORKER_CONCURRENCY` (10).
    pub worker_concurrency: usize,
    /// `WORKER_GROUP` (default).
    pub worker_group: String,
    /// `FLOW_TIMEOUT_SECONDS` (600).
    pub flow_timeout_seconds: u64,
    /// `WEBHOOK_TIMEOUT_SECONDS` (30).
    pub webhook_timeout_seconds: u64,
    /// `MAX_PAYLOAD_SIZE_MB` (25).
    pub max_payload_mb: u64,
    /// `MAX_FILE_SIZE_MB` (25).
    pub max_file_mb: u64,
    /// `FLOWCORE_QUOTA_RUNS_PER_DAY` (0 = off).
    pub quota_runs_per_day: u64,
    /// `FLOWCORE_SHUTDOWN_GRACE_SECONDS` (25).
    pub shutdown_grace_seconds: u64,
    /// `FLOWCORE_LEASE_SECONDS` (30).
    pub lease_seconds: u64,
    /// `MAX_RUN_LOG_SIZE_MB` (50).
    pub max_run_log_mb: u64,
    /// `NUMBER_OF_PROXIES` (0).
    pub number_of_proxies: usize,
    /// `RATE_LIMIT_PER_MINUTE` (0 = off).
    pub rate_limit_per_minute: u32,
    /// `FLOWCORE_AUTH_FAILURES_PER_MINUTE` (30; 0 = off).
    pub auth_failures_per_minute: u32,
    /// `FLOWCORE_MAX_CONNECTIONS` (1024).
    pub max_connections: usize,
    /// `FLOWCORE_HEADER_TIMEOUT_SECONDS` (10).
    pub header_timeout_seconds: u64,
    /// `FLOWCORE_IDLE_TIMEOUT_SECONDS` (60).
    pub idle_timeout_seconds: u64,
    /// `FLOWCORE_MAX_QUEUED_RUNS` (1000).
    pub max_queued_runs: usize,
    /// `FLOWCORE_HTTP_DENY` and `FLOWCORE_HTTP_ALLOW`: what `http_request` may reach.
    pub http_guard: flowcore::net::Guard,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "***");
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field("role", &self.role)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &flowcore_store::sql::redact_url(&self.database_url),
            )
            .field("database_pool_size", &self.database_pool_size)
            .field(
                "redis_url",
                &self
                    .redis_url
                    .as_deref()
                    .map(flowcore_store::sql::redact_url),
            )
            .field("redis_prefix", &self.redis_prefix)
            .field("storage", &self.storage)
            .field("encryption_key", &hidden(&self.encryption_key))
            .field("admin_key", &hidden(&self.admin_key))
            .field("worker_concurrency", &self.worker_concurrency)
            .field("worker_group", &self.worker_group)
            .field("flow_timeout_seconds", &self.flow_timeout_seconds)
            .field("webhook_timeout_seconds", &self.webhook_timeout_seconds)
            .field("max_payload_mb", &self.max_payload_mb)
            .field("max_file_mb", &self.max_file_mb)
            .field("max_run_log_mb", &self.max_run_log_mb)
            .field("number_of_proxies", &self.number_of_proxies)
            .field("rate_limit_per_minute", &self.rate_limit_per_minute)
            .field("auth_failures_per_minute", &self.auth_failures_per_minute)
            .field("max_connections", &self.max_connections)
            .field("header_timeout_seconds", &self.header_timeout_seconds)
            .field("idle_timeout_seconds", &self.idle_timeout_seconds)
            .field("max_queued_runs", &self.max_queued_runs)
            .field("http_guard", &self.http_guard)
            .field("quota_runs_per_day", &self.quota_runs_per_day)
            .field("shutdown_grace_seconds", &self.shutdown_grace_seconds)
            .field("lease_seconds", &self.lease_seconds)
            .finish()
    }
}

struct Env(HashMap<String, String>);

impl Env {
    fn get(&self, var: &'static str) -> Option<&str> {
        self.0.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn parse<T: FromStr>(
        &self,
        var: &'static str,
        default: T,
        check: impl Fn(&T) -> bool,
        expected: &str,
    ) -> Result<T, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(raw) => match raw.parse::<T>() {
                Ok(v) if check(&v) => Ok(v),
                _ => Err(ConfigError {
                    var,
                    message: format!("`{raw}` is not {expected}"),
                }),
            },
        }
    }
}

impl Config {
    /// `FLOWCORE_LEASE_SECONDS` as a duration: how long a worker holds a run (and its queue
    /// job) without renewing it.
    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_seconds)
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the given variables (for tests).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env = Env(vars.into_iter().collect());
        let positive = |v: &u64| *v > 0;
        let bind = env.parse(
            "FLOWCORE_BIND",
            SocketAddr::from(([127, 0, 0, 1], 3000)),
            |_| true,
            "an address like 127.0.0.1:3000",
        )?;
        let role = match env.get("FLOWCORE_ROLE").unwrap_or("all") {
            "all" => Role::All,
            "api" => Role::Api,
            "worker" => Role::Worker,
            other => {
                return Err(ConfigError {
                    var: "FLOWCORE_ROLE",
                    message: format!("`{other}` is not all, api or worker"),
                });
            }
        };
        let data_dir = PathBuf::from(env.get("FLOWCORE_DATA_DIR").unwrap_or("./.flowcore"));
        let database_url = match env.get("DATABASE_URL") {
            None => format!("sqlite://{}", data_dir.join("flowcore.db").display()),
            Some(url)
                if url.starts_with("sqlite:")
                    || url.starts_with("postgres://")
                    || url.starts_with("postgresql://") =>
            {
                url.to_owned()
            }
            Some(url) => {
                let scheme = url.split(':').next().unwrap_or_default();
                return Err(ConfigError {
                    var: "DATABASE_URL",
                    message: format!(
                        "unknown scheme `{scheme}` (expected sqlite:// or postgres://)"
                    ),
                });
            }
        };
        let redis_url = match env.get("REDIS_URL") {
            None => None,
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                Some(url.to_owned())
            }
            Some(_) => {
                return Err(ConfigError {
                    var: "REDIS_URL",
                    message: "expected redis://...".into(),
                });
            }
        };
        let redis_prefix = env
            .get("FLOWCORE_REDIS_PREFIX")
            .unwrap_or("flowcore")
            .to_owned();
        if !flowcore::model::is_valid_id(&redis_prefix) {
            return Err(ConfigError {
                var: "FLOWCORE_REDIS_PREFIX",
                message: "expected 1 to 64 of A-Z a-z 0-9 _ -".into(),
            });
        }
        let storage = match env.get("STORAGE_TYPE").unwrap_or("fs") {
            "fs" => BlobConfig::Fs {
                root: data_dir.join("blobs").display().to_string(),
            },
            "memory" => BlobConfig::Memory,
            "s3" => {
                let bucket = env.get("S3_STORAGE_BUCKET_NAME").ok_or(ConfigError {
                    var: "S3_STORAGE_BUCKET_NAME",
                    message: "required when STORAGE_TYPE=s3".into(),
                })?;
                BlobConfig::S3(S3Config {
                    bucket: bucket.to_owned(),
                    region: env.get("S3_STORAGE_REGION").map(str::to_owned),
                    endpoint: env.get("S3_ENDPOINT_URL").map(str::to_owned),
                    access_key_id: env.get("S3_STORAGE_ACCESS_KEY_ID").map(str::to_owned),
                    secret_access_key: env.get("S3_STORAGE_SECRET_ACCESS_KEY").map(str::to_owned),
                })
            }
            other => {
                return Err(ConfigError {
                    var: "STORAGE_TYPE",
                    message: format!("`{other}` is not fs, s3 or memory"),
                });
            }
        };
        let worker_group = env.get("WORKER_GROUP").unwrap_or("default").to_owned();
        if !flowcore::model::is_valid_id(&worker_group) {
            return Err(ConfigError {
                var: "WORKER_GROUP",
                message: "expected 1 to 64 of A-Z a-z 0-9 _ -".into(),
            });
        }
        Ok(Self {
            bind,
            role,
            database_url,
            database_pool_size: env.parse(
                "DATABASE_POOL_SIZE",
                10u32,
                |v| (1..=1000).contains(v),
                "a number from 1 to 1000",
            )?,
            redis_url,
            redis_prefix,
            storage,
            encryption_key: env.get("FLOWCORE_ENCRYPTION_KEY").map(str::to_owned),
            admin_key: env.get("FLOWCORE_ADMIN_KEY").map(str::to_owned),
            worker_concurrency: env.parse(
                "WORKER_CONCURRENCY",
                10usize,
                |v| (1..=10_000).contains(v),
                "a number from 1 to 10000",
            )?,
            worker_group,
            flow_timeout_seconds: env.parse(
                "FLOW_TIMEOUT_SECONDS",
                600u64,
                positive,
                "a positive number of seconds",
            )?,
            webhook_timeout_seconds: env.parse(
                "WEBHOOK_TIMEOUT_SECONDS",
                30u64,
                positive,
                "a positive number of seconds",
            )?,
            max_payload_mb: env.parse(
                "MAX_PAYLOAD_SIZE_MB",
                25u64,
                positive,
                "a positive number of MB",
            )?,
            max_file_mb: env.parse(
                "MAX_FILE_SIZE_MB",
                25u64,
                positive,
                "a positive number of MB",
            )?,
            max_run_log_mb: env.parse(
                "MAX_RUN_LOG_SIZE_MB",
                50u64,
                positive,
                "a positive number of MB",
            )?,
            number_of_proxies: env.parse(
                "NUMBER_OF_PROXIES",
                0usize,
                |v| *v <= 100,
                "a number from 0 to 100",
            )?,
            rate_limit_per_minute: env.parse(
                "RATE_LIMIT_PER_MINUTE",
                0u32,
                |_| true,
                "a number (0 = off)",
            )?,
            quota_runs_per_day: env.parse(
                "FLOWCORE_QUOTA_RUNS_PER_DAY",
                0u64,
                |_| true,
                "a number (0 = off)",
            )?,
            shutdown_grace_seconds: env.parse(
                "FLOWCORE_SHUTDOWN_GRACE_SECONDS",
                25u64,
                |v| *v <= 3600,
                "a number of seconds up to 3600",
            )?,
            lease_seconds: env.parse(
                "FLOWCORE_LEASE_SECONDS",
                30u64,
                |v| (2..=3600).contains(v),
                "a number of seconds from 2 to 3600",
            )?,
            auth_failures_per_minute: env.parse(
                "FLOWCORE_AUTH_FAILURES_PER_MINUTE",
                30u32,
                |_| true,
                "a number (0 = off)",
            )?,
            max_connections: env.parse(
                "FLOWCORE_MAX_CONNECTIONS",
                1024usize,
                |v| (1..=1_000_000).contains(v),
                "a number from 1 to 1000000",
            )?,
            header_timeout_seconds: env.parse(
                "FLOWCORE_HEADER_TIMEOUT_SECONDS",
                10u64,
                |v| (1..=3600).contains(v),
                "a number of seconds from 1 to 3600",
            )?,
            idle_timeout_seconds: env.parse(
                "FLOWCORE_IDLE_TIMEOUT_SECONDS",
                60u64,
                |v| (1..=86_400).contains(v),
                "a number of seconds from 1 to 86400",
            )?,
            max_queued_runs: env.parse(
                "FLOWCORE_MAX_QUEUED_RUNS",
                1000usize,
                |_| true,
                "a number",
            )?,
            http_guard: flowcore::net::Guard::parse(
                env.get("FLOWCORE_HTTP_DENY"),
                env.get("FLOWCORE_HTTP_ALLOW"),
            )
            .map_err(|message| ConfigError {
                var: if message.starts_with("FLOWCORE_HTTP_ALLOW") {
                    "FLOWCORE_HTTP_ALLOW"
                } else {
                    "FLOWCORE_HTTP_DENY"
                },
                message,
            })?,
            data_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:3000");
        assert_eq!(c.role, Role::All);
        assert_eq!(c.database_url, "sqlite://./.flowcore/flowcore.db");
        assert_eq!(
            (
                c.database_pool_size,
                c.worker_concurrency,
                c.flow_timeout_seconds,
                c.webhook_timeout_seconds
            ),
            (10, 10, 600, 30)
        );
        assert_eq!(
            (
                c.max_payload_mb,
                c.max_file_mb,
                c.max_run_log_mb,
                c.number_of_proxies,
                c.rate_limit_per_minute
            ),
            (25, 25, 50, 0, 0)
        );
        assert!(c.redis_url.is_none());
        assert_eq!(
            c.storage,
            BlobConfig::Fs {
                root: "./.flowcore/blobs".into()
            }
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value, expected) in [
            (
                "FLOWCORE_ROLE",
                "boss",
                "FLOWCORE_ROLE: `boss` is not all, api or worker",
            ),
            (
                "DATABASE_URL",
                "mysql://x",
                "DATABASE_URL: unknown scheme `mysql`",
            ),
            (
                "DATABASE_POOL_SIZE",
                "0",
                "DATABASE_POOL_SIZE: `0` is not a number from 1 to 1000",
            ),
            (
                "FLOWCORE_BIND",
                "nowhere",
                "FLOWCORE_BIND: `nowhere` is not an address",
            ),
            (
                "STORAGE_TYPE",
                "tape",
                "STORAGE_TYPE: `tape` is not fs, s3 or memory",
            ),
            ("MAX_PAYLOAD_SIZE_MB", "-1", "MAX_PAYLOAD_SIZE_MB"),
            ("REDIS_URL", "http://x", "REDIS_URL: expected redis://"),
            ("WORKER_GROUP", "a b", "WORKER_GROUP"),
        ] {
            let err = Config::from_vars(vars(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{var}={value}: {err}");
        }
        let err = Config::from_vars(vars(&[("STORAGE_TYPE", "s3")])).unwrap_err();
        assert_eq!(err.var, "S3_STORAGE_BUCKET_NAME");
    }

    #[test]
    fn debug_hides_secrets() {
        let c = Config::from_vars(vars(&[
            ("FLOWCORE_ADMIN_KEY", "admin-secret"),
            ("FLOWCORE_ENCRYPTION_KEY", "enc-secret"),
            ("DATABASE_URL", "postgres://u:db-secret@h/db"),
            ("STORAGE_TYPE", "s3"),
            ("S3_STORAGE_BUCKET_NAME", "b"),
            ("S3_STORAGE_SECRET_ACCESS_KEY", "s3-secret"),
        ]))
        .unwrap();
        let text = format!("{c:?}");
        for secret in ["admin-secret", "enc-secret", "db-secret", "s3-secret"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
}
