//! Configuration, read once from the environment (or `flowcore serve`'s flags). Each variable
//! is written once, as a field below: its name, default, bounds and doc comment (the text of
//! `flowcore serve --help`). An unknown or malformed value stops start-up with a message naming
//! the variable; `Debug` hides secrets.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, CommandFactory, FromArgMatches, Parser};
use flowcore_store::{BlobConfig, S3Config};

/// Which parts of the topology this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// API and worker in one process (the default).
    All,
    /// Stateless API server.
    Api,
    /// Worker: executes runs from the queue.
    Worker,
}

/// Where files and large outputs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageType {
    /// In the data dir.
    Fs,
    /// An S3 bucket (the `S3_*` variables).
    S3,
    /// In the process (lost on exit).
    Memory,
}

/// A configuration error, naming the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    /// The variable.
    pub var: String,
    /// What is wrong with it.
    pub message: String,
}

/// A secret: `Debug` shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Hidden(String);

impl fmt::Debug for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Deref for Hidden {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl FromStr for Hidden {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A database or Redis URL: `Debug` hides its password.
#[derive(Clone, PartialEq, Eq)]
pub struct Dsn(String);

impl Dsn {
    /// The URL.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&flowcore_store::sql::redact_url(&self.0))
    }
}

impl Deref for Dsn {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// A value parser: a number within `range`, with a message saying so.
/// A flow id as a setting names one.
fn flow_id(raw: &str) -> Result<String, String> {
    if flowcore::model::is_valid_id(raw) {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "`{raw}` is not a flow id (1 to 64 of A-Z a-z 0-9 _ -)"
        ))
    }
}

fn within<T>(
    range: std::ops::RangeInclusive<T>,
    what: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + fmt::Display + Clone + Send + Sync + 'static,
{
    move |raw: &str| match raw.parse::<T>() {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(format!(
            "`{raw}` is not a number of {what} from {} to {}",
            range.start(),
            range.end()
        )),
    }
}

fn database_url(raw: &str) -> Result<Dsn, String> {
    if raw.starts_with("sqlite:")
        || raw.starts_with("postgres://")
        || raw.starts_with("postgresql://")
    {
        Ok(Dsn(raw.to_owned()))
    } else {
        let scheme = raw.split(':').next().unwrap_or_default();
        Err(format!(
            "unknown scheme `{scheme}` (expected sqlite:// or postgres://)"
        ))
    }
}

fn redis_url(raw: &str) -> Result<Dsn, String> {
    if raw.starts_with("redis://") || raw.starts_with("rediss://") {
        Ok(Dsn(raw.to_owned()))
    } else {
        Err("expected redis://... or rediss://...".into())
    }
}

fn name(raw: &str) -> Result<String, String> {
    if flowcore::model::is_valid_id(raw) {
        Ok(raw.to_owned())
    } else {
        Err(format!("`{raw}` is not 1 to 64 of A-Z a-z 0-9 _ -"))
    }
}

fn address(raw: &str) -> Result<SocketAddr, String> {
    raw.parse()
        .map_err(|_| format!("`{raw}` is not an address like 127.0.0.1:3000"))
}

/// The server's configuration.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Configuration (each flag also reads the variable named beside it)")]
pub struct Config {
    /// Listen address.
    #[arg(long, env = "FLOWCORE_BIND", default_value = "127.0.0.1:3000", value_parser = address)]
    pub bind: SocketAddr,
    /// Which parts of the topology this process runs: all (api and worker in one process), api,
    /// worker.
    #[arg(long, env = "FLOWCORE_ROLE", value_enum, default_value = "all")]
    pub role: Role,
    /// Where the embedded defaults keep their files.
    #[arg(long, env = "FLOWCORE_DATA_DIR", default_value = "./.flowcore")]
    pub data_dir: PathBuf,
    /// sqlite://... or postgres://... (default: SQLite in the data dir).
    #[arg(long = "database-url", env = "DATABASE_URL", value_parser = database_url)]
    database: Option<Dsn>,
    /// The database URL: `DATABASE_URL`, or SQLite in the data dir.
    #[arg(skip = Dsn(String::new()))]
    pub database_url: Dsn,
    /// Database connections per process.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value = "10", value_parser = within(1u32..=1000, "connections"))]
    pub database_pool_size: u32,
    /// redis://...: a shared queue, cache and rate limits (unset: in-process ones).
    #[arg(long, env = "REDIS_URL", value_parser = redis_url)]
    pub redis_url: Option<Dsn>,
    /// The prefix of every Redis key.
    #[arg(long, env = "FLOWCORE_REDIS_PREFIX", default_value = "flowcore", value_parser = name)]
    pub redis_prefix: String,
    /// Where files and large outputs go: fs (in the data dir), s3, memory.
    #[arg(long, env = "STORAGE_TYPE", value_enum, default_value = "fs")]
    pub storage_type: StorageType,
    /// The S3 bucket (required with STORAGE_TYPE=s3).
    #[arg(long, env = "S3_STORAGE_BUCKET_NAME")]
    s3_bucket: Option<String>,
    /// The S3 region (us-east-1).
    #[arg(long, env = "S3_STORAGE_REGION")]
    s3_region: Option<String>,
    /// An S3-compatible endpoint.
    #[arg(long, env = "S3_ENDPOINT_URL")]
    s3_endpoint: Option<String>,
    /// The S3 access key id.
    #[arg(long, env = "S3_STORAGE_ACCESS_KEY_ID")]
    s3_access_key_id: Option<String>,
    /// The S3 secret key.
    #[arg(long, env = "S3_STORAGE_SECRET_ACCESS_KEY", hide_env_values = true)]
    s3_secret_access_key: Option<Hidden>,
    /// Where blobs go, from STORAGE_TYPE and the S3 variables.
    #[arg(skip = BlobConfig::Memory)]
    pub storage: BlobConfig,
    /// The credentials key (default: generated once into the data dir, mode 0600).
    #[arg(long, env = "FLOWCORE_ENCRYPTION_KEY", hide_env_values = true)]
    pub encryption_key: Option<Hidden>,
    /// A bootstrap API key with every scope.
    #[arg(long, env = "FLOWCORE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<Hidden>,
    /// Runs one process executes at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value = "10", value_parser = within(1usize..=10_000, "runs"))]
    pub worker_concurrency: usize,
    /// The queue a worker takes runs from.
    #[arg(long, env = "WORKER_GROUP", default_value = "default", value_parser = name)]
    pub worker_group: String,
    /// A run's time limit.
    #[arg(long, env = "FLOW_TIMEOUT_SECONDS", default_value = "600", value_parser = within(1u64..=u64::MAX / 2, "seconds"))]
    pub flow_timeout_seconds: u64,
    /// How long a waited run (a sync webhook, a start with `wait`) is waited for.
    #[arg(long, env = "WEBHOOK_TIMEOUT_SECONDS", default_value = "30", value_parser = within(1u64..=86_400, "seconds"))]
    pub webhook_timeout_seconds: u64,
    /// The request body limit.
    #[arg(long = "max-payload-size-mb", env = "MAX_PAYLOAD_SIZE_MB", default_value = "25", value_parser = within(1u64..=1_000_000, "MB"))]
    pub max_payload_mb: u64,
    /// The limit of one file, or one step's output.
    #[arg(long = "max-file-size-mb", env = "MAX_FILE_SIZE_MB", default_value = "25", value_parser = within(1u64..=1_000_000, "MB"))]
    pub max_file_mb: u64,
    /// The limit of one run's stored log.
    #[arg(long = "max-run-log-size-mb", env = "MAX_RUN_LOG_SIZE_MB", default_value = "50", value_parser = within(1u64..=1_000_000, "MB"))]
    pub max_run_log_mb: u64,
    /// Trusted proxies in front (how deep X-Forwarded-For is read).
    #[arg(long, env = "NUMBER_OF_PROXIES", default_value = "0", value_parser = within(0usize..=100, "proxies"))]
    pub number_of_proxies: usize,
    /// Requests per client address and per API key and minute (0 = off).
    #[arg(long, env = "RATE_LIMIT_PER_MINUTE", default_value = "0")]
    pub rate_limit_per_minute: u32,
    /// Requests with a missing or wrong API key one client address may make per minute before
    /// 429 (0 = off).
    #[arg(long, env = "FLOWCORE_AUTH_FAILURES_PER_MINUTE", default_value = "30")]
    pub auth_failures_per_minute: u32,
    /// Open client connections per process; more wait in the listen backlog.
    #[arg(long, env = "FLOWCORE_MAX_CONNECTIONS", default_value = "1024", value_parser = within(1usize..=1_000_000, "connections"))]
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and a kept-alive connection
    /// may stay idle.
    #[arg(long, env = "FLOWCORE_HEADER_TIMEOUT_SECONDS", default_value = "10", value_parser = within(1u64..=3600, "seconds"))]
    pub header_timeout_seconds: u64,
    /// The longest pause inside a request body; a webhook's whole body must arrive within it.
    #[arg(long, env = "FLOWCORE_IDLE_TIMEOUT_SECONDS", default_value = "60", value_parser = within(1u64..=86_400, "seconds"))]
    pub idle_timeout_seconds: u64,
    /// Waited runs waiting for a slot, and runs in a group's queue, before 503 overloaded
    /// (0 = no bound).
    #[arg(long, env = "FLOWCORE_MAX_QUEUED_RUNS", default_value = "1000")]
    pub max_queued_runs: usize,
    /// What http_request never reaches: CIDR ranges and the words loopback, link-local,
    /// private, unspecified, self; a value replaces the default
    /// (loopback,link-local,private,unspecified,self).
    #[arg(long, env = "FLOWCORE_HTTP_DENY")]
    http_deny: Option<String>,
    /// CIDR ranges or host:port that http_request may reach despite FLOWCORE_HTTP_DENY.
    #[arg(long, env = "FLOWCORE_HTTP_ALLOW")]
    http_allow: Option<String>,
    /// What `http_request` may reach, from FLOWCORE_HTTP_DENY and FLOWCORE_HTTP_ALLOW.
    #[arg(skip = flowcore::net::Guard::default())]
    pub http_guard: flowcore::net::Guard,
    /// Runs one flow may start per UTC day; more get 429 quota_exceeded (0 = off).
    #[arg(long, env = "FLOWCORE_QUOTA_RUNS_PER_DAY", default_value = "0")]
    pub quota_runs_per_day: u64,
    /// LLM tokens (prompt and completion) one flow may use per UTC day; past them new runs
    /// get 429 quota_exceeded (0 = off). A run under way finishes.
    #[arg(long, env = "FLOWCORE_QUOTA_TOKENS_PER_DAY", default_value = "0")]
    pub quota_tokens_per_day: u64,
    /// On SIGTERM, how long runs may finish before they are handed back to the queue.
    #[arg(long, env = "FLOWCORE_SHUTDOWN_GRACE_SECONDS", default_value = "25", value_parser = within(0u64..=3600, "seconds"))]
    pub shutdown_grace_seconds: u64,
    /// Finished runs older than this many days are deleted, with their steps (0 = kept for
    /// ever); a flow's `settings.retention.days` replaces it. Queued and running runs stay.
    #[arg(long, env = "FLOWCORE_RUN_RETENTION_DAYS", default_value = "14", value_parser = within(0u32..=36_500, "days"))]
    pub run_retention_days: u32,
    /// At most this many finished runs of each flow are kept, the newest (unset: no bound); a
    /// flow's `settings.retention.max_count` replaces it.
    #[arg(long, env = "FLOWCORE_RUN_RETENTION_MAX_COUNT", value_parser = within(1u64..=u64::MAX, "runs"))]
    pub run_retention_max_count: Option<u64>,
    /// The data (input, output, trigger, steps) of runs that finished more than this many days
    /// ago is dropped, their summary kept until FLOWCORE_RUN_RETENTION_DAYS (0 = kept as long
    /// as the run); a flow's `settings.retention.data_days` replaces it.
    #[arg(long, env = "FLOWCORE_RUN_DATA_RETENTION_DAYS", default_value = "0", value_parser = within(0u32..=36_500, "days"))]
    pub run_data_retention_days: u32,
    /// `true`: runs that retention deletes are first written to the blob store (gzipped JSON
    /// lines under `archive/`), and `GET /api/v1/runs/{id}` still finds them there.
    #[arg(long, env = "FLOWCORE_ARCHIVE", default_value = "false", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub archive: bool,
    /// The flow whose run starts (once) when a run ends `failed` or `timed_out`, for flows
    /// whose `settings.on_failure` names none; unset: none.
    #[arg(long, env = "FLOWCORE_ON_FAILURE_FLOW", value_parser = flow_id)]
    pub on_failure_flow: Option<String>,
    /// A worker's hold on a run, renewed every third of it; a dead worker's runs move on after
    /// it.
    #[arg(long, env = "FLOWCORE_LEASE_SECONDS", default_value = "30", value_parser = within(2u64..=3600, "seconds"))]
    pub lease_seconds: u64,
    /// The address users reach the server at (`https://flows.example.com`), for the resume
    /// URLs that templates see as `run.resume_urls.<signal>`; default `http://` and
    /// FLOWCORE_BIND.
    #[arg(long, env = "FLOWCORE_PUBLIC_URL", value_parser = public_url)]
    pub public_url: Option<String>,
}

/// An `http://` or `https://` URL without a query or fragment, kept without its last `/`.
fn public_url(raw: &str) -> Result<String, String> {
    let url = raw.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("`{raw}` is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.contains(['?', '#', ' ']) {
        return Err(format!("`{raw}` is not a URL without a query"));
    }
    Ok(url.to_owned())
}

/// `Config` alone, as a command: what the environment is parsed against.
#[derive(Parser)]
#[command(name = "flowcore", no_binary_name = true)]
struct Parsed {
    #[command(flatten)]
    config: Config,
}

impl Config {
    /// Where users reach the server: `FLOWCORE_PUBLIC_URL`, else `http://` and the bind
    /// address.
    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.bind))
    }

    /// `FLOWCORE_LEASE_SECONDS` as a duration: how long a worker holds a run (and its queue
    /// job) without renewing it.
    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_seconds)
    }

    /// Every variable the server reads, with its default and meaning (from the fields above).
    pub fn variables() -> Vec<Variable> {
        Parsed::command()
            .get_arguments()
            .filter_map(|arg| {
                Some(Variable {
                    name: arg.get_env()?.to_string_lossy().into_owned(),
                    default: arg
                        .get_default_values()
                        .first()
                        .map(|v| v.to_string_lossy().into_owned()),
                    meaning: arg.get_help().map(ToString::to_string).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the given variables (the process environment, or a test's); an empty value counts
    /// as unset.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = vars.into_iter().collect();
        // The variables become flags, and the command reads nothing else (not the process's
        // own environment, whatever `vars` is).
        let mut args = Vec::new();
        let command = Parsed::command().mut_args(|arg| {
            if let (Some(env), Some(long)) = (arg.get_env(), arg.get_long())
                && let Some(value) = vars.get(&*env.to_string_lossy())
                && !value.trim().is_empty()
            {
                args.push(format!("--{long}={}", value.trim()));
            }
            arg.env(None::<&str>)
        });
        let matches = command
            .try_get_matches_from(&args)
            .map_err(|e| error_of(&e))?;
        let config = Self::from_arg_matches(&matches).map_err(|e| error_of(&e))?;
        config.complete()
    }

    /// Fills in what depends on several variables: the database URL, the blob store, the HTTP
    /// guard.
    fn complete(mut self) -> Result<Self, ConfigError> {
        self.database_url = match &self.database {
            Some(url) => url.clone(),
            None => Dsn(format!(
                "sqlite://{}",
                self.data_dir.join("flowcore.db").display()
            )),
        };
        self.storage = match self.storage_type {
            StorageType::Fs => BlobConfig::Fs {
                root: self.data_dir.join("blobs").display().to_string(),
            },
            StorageType::Memory => BlobConfig::Memory,
            StorageType::S3 => BlobConfig::S3(S3Config {
                bucket: self.s3_bucket.clone().ok_or_else(|| ConfigError {
                    var: "S3_STORAGE_BUCKET_NAME".into(),
                    message: "required when STORAGE_TYPE=s3".into(),
                })?,
                region: self.s3_region.clone(),
                endpoint: self.s3_endpoint.clone(),
                access_key_id: self.s3_access_key_id.clone(),
                secret_access_key: self.s3_secret_access_key.as_deref().map(str::to_owned),
            }),
        };
        self.http_guard =
            flowcore::net::Guard::parse(self.http_deny.as_deref(), self.http_allow.as_deref())
                .map_err(|message| ConfigError {
                    var: if message.starts_with("FLOWCORE_HTTP_ALLOW") {
                        "FLOWCORE_HTTP_ALLOW"
                    } else {
                        "FLOWCORE_HTTP_DENY"
                    }
                    .into(),
                    message,
                })?;
        Ok(self)
    }
}

/// One variable the server reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// Its name.
    pub name: String,
    /// Its default, when it has one.
    pub default: Option<String>,
    /// What it does.
    pub meaning: String,
}

/// A parse error as a [`ConfigError`] naming the variable of the flag that failed.
fn error_of(e: &clap::Error) -> ConfigError {
    use clap::error::{ContextKind, ContextValue};
    let flag = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(flag)) => flag.clone(),
        _ => String::new(),
    };
    let long = flag
        .trim_start_matches("--")
        .split([' ', '='])
        .next()
        .unwrap_or_default()
        .to_owned();
    let var = Parsed::command()
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long.as_str()))
        .and_then(|arg| arg.get_env().map(|env| env.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "configuration".into());
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => String::new(),
    };
    let message = match (e.kind(), std::error::Error::source(e)) {
        (_, Some(source)) => source.to_string(),
        (clap::error::ErrorKind::InvalidValue, None) => {
            let valid = match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(valid)) => valid.join(", "),
                _ => String::new(),
            };
            format!("`{value}` is not one of {valid}")
        }
        _ => e.to_string(),
    };
    ConfigError { var, message }
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
        assert_eq!(c.database_url.as_str(), "sqlite://./.flowcore/flowcore.db");
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
        assert_eq!(c.lease(), std::time::Duration::from_secs(30));
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value, expected) in [
            (
                "FLOWCORE_ROLE",
                "boss",
                "FLOWCORE_ROLE: `boss` is not one of all, api, worker",
            ),
            (
                "DATABASE_URL",
                "mysql://x",
                "DATABASE_URL: unknown scheme `mysql`",
            ),
            (
                "DATABASE_POOL_SIZE",
                "0",
                "DATABASE_POOL_SIZE: `0` is not a number of connections from 1 to 1000",
            ),
            (
                "FLOWCORE_BIND",
                "nowhere",
                "FLOWCORE_BIND: `nowhere` is not an address",
            ),
            (
                "STORAGE_TYPE",
                "tape",
                "STORAGE_TYPE: `tape` is not one of fs, s3, memory",
            ),
            ("MAX_PAYLOAD_SIZE_MB", "-1", "MAX_PAYLOAD_SIZE_MB: `-1`"),
            ("REDIS_URL", "http://x", "REDIS_URL: expected redis://"),
            ("WORKER_GROUP", "a b", "WORKER_GROUP: `a b`"),
            ("FLOWCORE_HTTP_DENY", "nonsense", "FLOWCORE_HTTP_DENY"),
        ] {
            let err = Config::from_vars(vars(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "{var}={value}: {err}");
        }
        let err = Config::from_vars(vars(&[("STORAGE_TYPE", "s3")])).unwrap_err();
        assert_eq!(err.var, "S3_STORAGE_BUCKET_NAME");
        // Empty is unset.
        let c = Config::from_vars(vars(&[("FLOWCORE_ROLE", " "), ("DATABASE_URL", "")])).unwrap();
        assert_eq!(c.role, Role::All);
    }

    #[test]
    fn debug_hides_secrets() {
        let c = Config::from_vars(vars(&[
            ("FLOWCORE_ADMIN_KEY", "admin-secret"),
            ("FLOWCORE_ENCRYPTION_KEY", "enc-secret"),
            ("DATABASE_URL", "postgres://u:db-secret@h/db"),
            ("REDIS_URL", "redis://:redis-secret@h"),
            ("STORAGE_TYPE", "s3"),
            ("S3_STORAGE_BUCKET_NAME", "b"),
            ("S3_STORAGE_SECRET_ACCESS_KEY", "s3-secret"),
        ]))
        .unwrap();
        let text = format!("{c:?}");
        for secret in [
            "admin-secret",
            "enc-secret",
            "db-secret",
            "redis-secret",
            "s3-secret",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(c.admin_key.as_deref(), Some("admin-secret"));
    }

    #[test]
    fn every_variable_is_listed_once_with_its_meaning() {
        let variables = Config::variables();
        let names: std::collections::BTreeSet<_> = variables.iter().map(|v| &v.name).collect();
        assert_eq!(names.len(), variables.len(), "no variable twice");
        assert!(variables.len() >= 30, "{variables:?}");
        for v in &variables {
            assert!(!v.meaning.is_empty(), "{} has a meaning", v.name);
        }
        let bind = variables
            .iter()
            .find(|v| v.name == "FLOWCORE_BIND")
            .unwrap();
        assert_eq!(bind.default.as_deref(), Some("127.0.0.1:3000"));
    }
}
