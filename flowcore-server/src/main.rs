//! The `flowcore` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};
use flowcore::ports::FlowStore;
use flowcore::ports::memory::MemoryFlowStore;
use flowcore::{Engine, FlowDef, RunEvent, RunStatus};
use serde_json::Value;

/// flowcore: a workflow engine.
#[derive(Debug, Parser)]
#[command(name = "flowcore", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the server (configuration from the environment; see the variables below).
    #[command(after_help = serve_help())]
    Serve,
    /// Runs the database migrations (DATABASE_URL) and exits; a second run does nothing.
    Migrate,
    /// Manages API keys in the database (DATABASE_URL).
    #[command(name = "api-key", subcommand)]
    ApiKey(ApiKeyCommand),
    /// Makes a new credentials key current and re-encrypts every credential under it. With the
    /// key file of the data dir, a new key is generated (older ones stay in the file, readable);
    /// with FLOWCORE_ENCRYPTION_KEY, put the new key first in the variable, then run this.
    RotateKey,
    /// Asks the server on this machine whether it is ready (`GET /readyz` on FLOWCORE_BIND's
    /// port, or `--url`): exits 0 when it answers 200, for container health checks (the
    /// runtime image has no curl).
    Health {
        /// The URL to ask instead, `http://host:port/path`.
        #[arg(long)]
        url: Option<String>,
    },
    /// Checks a flow file: prints "ok", or every problem one a line and exits 1.
    Validate {
        /// The flow's JSON file.
        flow: PathBuf,
    },
    /// Runs a flow in this process (no server, nothing stored): progress on stderr, the output
    /// as JSON on stdout; exits 1 when the run does not succeed. A `wait` takes its signal from
    /// `--signal`, or else from stdin, one `NAME JSON` a line; a long `delay` sleeps here.
    Run {
        /// The flow's JSON file.
        flow: PathBuf,
        /// The run's input, as JSON.
        #[arg(long, default_value = "{}")]
        input: String,
        /// A signal for the run's `wait` nodes, `NAME=JSON` (repeatable; kept until a `wait`
        /// for NAME takes it).
        #[arg(long = "signal", value_name = "NAME=JSON")]
        signals: Vec<String>,
        /// A folder of flow files that `subflow` nodes may call, by their `id`.
        #[arg(long)]
        flows_dir: Option<PathBuf>,
        /// The run's time limit in seconds.
        #[arg(long, env = "FLOW_TIMEOUT_SECONDS", default_value_t = 600)]
        timeout_seconds: u64,
        /// No progress lines on stderr.
        #[arg(long, short)]
        quiet: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ApiKeyCommand {
    /// Creates a key and prints it once on stdout.
    Create {
        /// A name to recognise the key by.
        #[arg(long, default_value = "cli")]
        name: String,
    },
}

/// mimalloc instead of glibc's malloc: under load the server allocates from many threads (the
/// runtime's and the blocking pool's SQLite calls), where glibc's arenas spent about a fifth of
/// the CPU in malloc, free and their locks (`perf`, see BENCHMARKS.md).
/// Wrapped in flowcore's counting allocator, which keeps each thread's live bytes so that a
/// script can be stopped when it holds more than `Limits::max_node_memory_bytes`.
#[global_allocator]
static ALLOCATOR: flowcore::memory::Counting<mimalloc::MiMalloc> =
    flowcore::memory::Counting(mimalloc::MiMalloc);

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log written to a file or a collector stays plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // The server logs its requests; the in-process commands only their problems.
                tracing_subscriber::EnvFilter::new(if matches!(cli.command, Command::Serve) {
                    "info"
                } else {
                    "warn"
                })
            }),
        )
        .init();
    match cli.command {
        Command::Serve => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(format!("cannot start the runtime: {e}")),
            };
            runtime.block_on(serve())
        }
        Command::Migrate => with_runtime(migrate()),
        Command::ApiKey(ApiKeyCommand::Create { name }) => with_runtime(api_key_create(name)),
        Command::RotateKey => with_runtime(rotate_key()),
        Command::Health { url } => health(url.as_deref()),
        Command::Validate { flow } => validate(&flow),
        Command::Run {
            flow,
            input,
            signals,
            flows_dir,
            timeout_seconds,
            quiet,
        } => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(format!("cannot start the runtime: {e}")),
            };
            let code = runtime.block_on(run(
                &flow,
                &input,
                &signals,
                flows_dir.as_deref(),
                timeout_seconds,
                quiet,
            ));
            // A read of stdin (a `wait` asking for its signal) cannot be stopped: the process
            // does not wait for it to end.
            runtime.shutdown_background();
            code
        }
    }
}

/// `flowcore health`. A plain HTTP/1.1 GET over a socket: the target is the server on this
/// machine, over plain HTTP, so an HTTP client (and its TLS setup) would add nothing.
fn health(url: Option<&str>) -> ExitCode {
    use std::io::{Read, Write};
    let (address, path) = match url {
        Some(url) => {
            let Some(rest) = url.strip_prefix("http://") else {
                return fail(format!("--url: `{url}` is not an http:// URL"));
            };
            match rest.split_once('/') {
                Some((a, p)) => (a.to_owned(), format!("/{p}")),
                None => (rest.to_owned(), "/".to_owned()),
            }
        }
        None => {
            let bind = std::env::var("FLOWCORE_BIND").unwrap_or_else(|_| "127.0.0.1:3000".into());
            let Some((_, port)) = bind.rsplit_once(':') else {
                return fail(format!("FLOWCORE_BIND: `{bind}` has no port"));
            };
            (format!("127.0.0.1:{port}"), "/readyz".to_owned())
        }
    };
    let timeout = std::time::Duration::from_secs(5);
    let answer = (|| -> std::io::Result<String> {
        use std::net::ToSocketAddrs;
        let target = address
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut sock = std::net::TcpStream::connect_timeout(&target, timeout)?;
        sock.set_read_timeout(Some(timeout))?;
        write!(
            sock,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        sock.take(64 * 1024).read_to_string(&mut out)?;
        Ok(out)
    })();
    match answer {
        Ok(out) if out.get(9..12) == Some("200") => ExitCode::SUCCESS,
        Ok(out) => fail(format!(
            "{address}{path} answered: {}",
            out.lines().next().unwrap_or("nothing")
        )),
        Err(e) => fail(format!("{address}{path}: {e}")),
    }
}

fn with_runtime(job: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(job),
        Err(e) => fail(format!("cannot start the runtime: {e}")),
    }
}

async fn sql_store() -> Result<flowcore_store::SqlStore, String> {
    let config =
        flowcore_server::config::Config::from_env().map_err(|e| format!("configuration: {e}"))?;
    let mut sql = flowcore_store::SqlConfig::new(config.database_url.as_str());
    sql.pool_size = 2;
    let store = flowcore_store::SqlStore::connect(sql)
        .await
        .map_err(|e| format!("database: {}", flowcore::error::causes(&e)))?;
    Ok(store)
}

async fn migrate() -> ExitCode {
    let store = match sql_store().await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match store.migrate().await {
        Ok(n) => {
            println!("{n} migration(s) applied");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("migrating: {}", flowcore::error::causes(&e))),
    }
}

async fn api_key_create(name: String) -> ExitCode {
    use flowcore::ports::ApiKeyStore;
    let store = match sql_store().await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if let Err(e) = store.migrate().await {
        return fail(format!("migrating: {}", flowcore::error::causes(&e)));
    }
    let (record, key) = match flowcore_server::auth::generate(&name) {
        Ok(k) => k,
        Err(e) => return fail(e.to_string()),
    };
    if let Err(e) = store.insert_api_key(&record).await {
        return fail(format!("storing the key: {e}"));
    }
    eprintln!(
        "API key `{name}` created (id {}); it is shown once:",
        record.id
    );
    println!("{key}");
    ExitCode::SUCCESS
}

async fn rotate_key() -> ExitCode {
    let config = match flowcore_server::config::Config::from_env() {
        Ok(c) => c,
        Err(e) => return fail(format!("configuration: {e}")),
    };
    let (_, credentials) = match flowcore_server::open_credentials(&config).await {
        Ok(c) => c,
        Err(e) => return fail(format!("start-up: {}", flowcore::error::causes(&e))),
    };
    let key_id = match credentials.rotate() {
        Ok(id) => id,
        Err(e) => return fail(format!("rotating: {e}")),
    };
    match credentials.reencrypt_all().await {
        Ok(n) => {
            println!("{n} credential(s) re-encrypted under key {key_id}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("re-encrypting: {e}")),
    }
}

fn serve_help() -> String {
    let mut text = String::from("Environment variables:\n");
    for v in flowcore_server::config::Config::variables() {
        let default = v
            .default
            .map(|d| format!(" (default: {d})"))
            .unwrap_or_default();
        text.push_str(&format!("  {:<34} {}{default}\n", v.name, v.meaning));
    }
    // Read by the log subscriber, not by the configuration.
    text.push_str(&format!(
        "  {:<34} {}\n",
        "RUST_LOG", "log filter, e.g. `warn` or `info,flowcore_server=debug` (default: info)"
    ));
    text
}

async fn serve() -> ExitCode {
    let config = match flowcore_server::config::Config::from_env() {
        Ok(config) => config,
        Err(e) => return fail(format!("configuration: {e}")),
    };
    let state = match flowcore_server::build_state(config).await {
        Ok(state) => state,
        Err(e) => return fail(format!("start-up: {}", flowcore::error::causes(&e))),
    };
    let bind = state.config.bind;
    let stop = flowcore::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            stop.cancel();
        }
    });
    match flowcore_server::serve(state, stop).await {
        Ok(handed_back) => {
            tracing::info!(handed_back, "stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("cannot listen on {bind}: {e}")),
    }
}

/// Ctrl-C or SIGTERM: stop accepting, finish in-flight requests.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

/// Why a flow file was refused.
enum FlowFileError {
    /// It could not be read, or is not JSON.
    Unreadable(String),
    /// Its problems, each placed in the file (path, line and column).
    Invalid(flowcore::CompileError),
}

impl FlowFileError {
    /// The message: the file, and every problem one a line.
    fn message(&self, path: &Path) -> String {
        match self {
            Self::Unreadable(e) => e.clone(),
            Self::Invalid(e) => {
                let each: Vec<String> = e
                    .problems
                    .iter()
                    .map(|p| format!("  {}", printable(&p.to_string())))
                    .collect();
                format!(
                    "{} is not a valid flow:\n{}",
                    path.display(),
                    each.join("\n")
                )
            }
        }
    }
}

/// A flow file, read as the API reads a flow: every problem of its shape, each with its path,
/// line and column. Also its text, to place the compiler's problems in.
fn read_flow(path: &Path) -> Result<(FlowDef, Vec<u8>), FlowFileError> {
    let bytes = std::fs::read(path)
        .map_err(|e| FlowFileError::Unreadable(format!("cannot read {}: {e}", path.display())))?;
    let value = flowcore::json::parse(&bytes).map_err(|e| {
        FlowFileError::Unreadable(format!("{}: not valid JSON: {e}", path.display()))
    })?;
    match FlowDef::from_value_all(value) {
        Ok(flow) => Ok((flow, bytes)),
        Err(e) => Err(FlowFileError::Invalid(e.locate(&bytes))),
    }
}

fn validate(path: &Path) -> ExitCode {
    let problems = match read_flow(path) {
        Ok((flow, text)) => match Engine::new().compile(&flow) {
            Ok(_) => {
                println!("ok");
                return ExitCode::SUCCESS;
            }
            Err(e) => e.locate(&text),
        },
        Err(FlowFileError::Invalid(e)) => e,
        Err(e) => return fail(e.message(path)),
    };
    for problem in &problems.problems {
        println!("{}", printable(&problem.to_string()));
    }
    ExitCode::FAILURE
}

/// `text` with its control characters escaped (`\u{1b}`): a problem quotes the flow file's
/// keys, and a terminal must not take one for a command.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

async fn run(
    path: &Path,
    input: &str,
    signals: &[String],
    flows_dir: Option<&Path>,
    timeout_seconds: u64,
    quiet: bool,
) -> ExitCode {
    let (flow, text) = match read_flow(path) {
        Ok(read) => read,
        Err(e) => return fail(e.message(path)),
    };
    let input: Value = match flowcore::json::parse(input.as_bytes()) {
        Ok(v) => v,
        Err(e) => return fail(format!("--input is not valid JSON: {e}")),
    };
    // The same outbound rules as the server's.
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let guard = match flowcore::net::Guard::parse(
        var("FLOWCORE_HTTP_DENY").as_deref(),
        var("FLOWCORE_HTTP_ALLOW").as_deref(),
    ) {
        Ok(guard) => guard,
        Err(e) => return fail(e),
    };
    let store = Arc::new(MemoryFlowStore::new());
    if let Some(dir) = flows_dir
        && let Err(e) = load_flows(&*store, dir).await
    {
        return fail(e);
    }
    if flow.id.is_some()
        && store
            .get(flow.id.as_deref().unwrap_or_default(), None)
            .await
            .is_err()
    {
        let _ = store.create(&flow).await;
    }
    let limits = flowcore::Limits {
        run_timeout: std::time::Duration::from_secs(timeout_seconds.max(1)),
        ..Default::default()
    };
    let engine = Engine::builder()
        .limits(limits)
        .flow_store(store)
        .http_guard(guard)
        .build();
    let plan = match engine.compile(&flow) {
        Ok(plan) => plan,
        Err(e) => return fail(FlowFileError::Invalid(e.locate(&text)).message(path)),
    };
    let mut given = Vec::new();
    for signal in signals {
        match parse_signal(signal, '=') {
            Ok(parsed) => given.push(parsed),
            Err(e) => return fail(format!("--signal {signal}: {e}")),
        }
    }
    let started = Instant::now();
    let events: Option<Arc<dyn flowcore::EventSink>> =
        (!quiet).then(|| Arc::new(move |event: &RunEvent| progress(event, started)) as Arc<_>);
    let cancel = flowcore::CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        });
    }
    let result = run_durably(&engine, &plan, input, given, events, cancel).await;
    match result {
        Ok(run) if run.status == RunStatus::Succeeded => {
            let output = run.output.unwrap_or(Value::Null);
            let text = match serde_json::to_string_pretty(&output) {
                Ok(text) => text,
                Err(e) => return fail(format!("cannot print the output: {e}")),
            };
            // A reader that stopped early (`| head`) is not an error of the run (`println!`
            // would panic on the closed pipe).
            use std::io::Write;
            match writeln!(std::io::stdout().lock(), "{text}") {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    fail(format!("cannot print the output: {e}"))
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Ok(run) => fail(format!(
            "run {}: {}",
            run.status,
            run.error.unwrap_or_default()
        )),
        Err(e) => fail(e),
    }
}

/// A signal as the command line takes it: `NAME{sep}JSON`.
fn parse_signal(text: &str, sep: char) -> Result<(String, Value), String> {
    let (name, payload) = text
        .split_once(sep)
        .ok_or_else(|| format!("give NAME{sep}JSON"))?;
    let name = name.trim();
    if !flowcore::nodes::is_signal_name(name) {
        return Err(format!(
            "`{name}` is not a signal name (1 to 100 of A-Z a-z 0-9 _ - .)"
        ));
    }
    let payload = flowcore::json::parse(payload.trim().as_bytes())
        .map_err(|e| format!("the payload is not valid JSON: {e}"))?;
    Ok((name.to_owned(), payload))
}

/// The longest line of stdin a run takes as a signal: a name, a space and a payload of at most
/// [`flowcore_server::lifecycle::MAX_SIGNAL_BYTES`].
const MAX_SIGNAL_LINE: usize = flowcore_server::lifecycle::MAX_SIGNAL_BYTES + 128;

/// Lines of a reader, each at most `max` bytes: a longer one is read to its end and answered
/// as an error without being kept, and so is one that is not UTF-8; the lines after it come
/// as usual. (tokio's `lines()` keeps a line of any length, and tokio-util's codecs end their
/// stream at the first such error.) Cancel-safe: a line read in part stays here for the next
/// call, so it can stand in a `select!`.
struct BoundedLines<R> {
    reader: R,
    max: usize,
    line: Vec<u8>,
    too_long: bool,
}

impl<R: tokio::io::AsyncBufRead + Unpin> BoundedLines<R> {
    fn new(reader: R, max: usize) -> Self {
        Self {
            reader,
            max,
            line: Vec::new(),
            too_long: false,
        }
    }

    /// The next line without its end (`\n` or `\r\n`); `Ok(None)` at the end of the input.
    async fn next_line(&mut self) -> std::io::Result<Option<Result<String, String>>> {
        use tokio::io::AsyncBufReadExt;
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                if self.line.is_empty() && !self.too_long {
                    return Ok(None);
                }
                return Ok(Some(self.take()));
            }
            let (chunk, used, ended) = match buf.iter().position(|b| *b == b'\n') {
                Some(at) => (&buf[..at], at + 1, true),
                None => (buf, buf.len(), false),
            };
            if !self.too_long {
                if self.line.len() + chunk.len() > self.max {
                    self.too_long = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            self.reader.consume(used);
            if ended {
                return Ok(Some(self.take()));
            }
        }
    }

    /// The line read so far, and a fresh start.
    fn take(&mut self) -> Result<String, String> {
        let line = std::mem::take(&mut self.line);
        if std::mem::take(&mut self.too_long) {
            return Err(format!(
                "a line longer than {} bytes was left out",
                self.max
            ));
        }
        let mut line = String::from_utf8(line)
            .map_err(|_| "a line that is not UTF-8 was left out".to_owned())?;
        if line.ends_with('\r') {
            line.pop();
        }
        Ok(line)
    }
}

/// Executes a run durably over in-memory stores, as a worker would, so that `wait` and long
/// `delay`s park it: a parked run is woken by a signal (given up front, or read from stdin) or
/// by its time, and executed again, until it ends.
async fn run_durably(
    engine: &Engine,
    plan: &flowcore::Plan,
    input: Value,
    given: Vec<(String, Value)>,
    events: Option<Arc<dyn flowcore::EventSink>>,
    cancel: flowcore::CancellationToken,
) -> Result<flowcore::ports::RunRecord, String> {
    use flowcore::durable::{self, DurableOptions, Hooks};
    use flowcore::ports::memory::MemoryRunStore;
    use flowcore::ports::{Due, NewRun, RunStore, Signal};

    let runs: Arc<dyn RunStore> = Arc::new(MemoryRunStore::new());
    let options = DurableOptions::new("cli");
    let new = NewRun::new("cli", 1, input).claimed(options.claim());
    let (mut run, _) = runs.create(new).await.map_err(|e| e.to_string())?;
    let id = run.id.clone();
    let send = async |name: &str, payload: &Value| {
        let signal = Signal {
            name,
            payload,
            key: None,
        };
        runs.send_signal(&id, signal)
            .await
            .map_err(|e| e.to_string())
    };
    for (name, payload) in &given {
        send(name, payload).await?;
    }
    let mut stdin = BoundedLines::new(
        tokio::io::BufReader::new(tokio::io::stdin()),
        MAX_SIGNAL_LINE,
    );
    let mut stdin_open = true;
    loop {
        let hooks = Hooks {
            events: events.clone(),
            cancel: Some(cancel.clone()),
            hand_back: None,
        };
        let done = durable::execute(engine, plan, &runs, &run, &options, hooks)
            .await
            .map_err(|e| e.to_string())?;
        if done.status.is_final() {
            return Ok(done);
        }
        // Parked: wait for a signal or the time that wakes it (a signal may have come while
        // it parked: then it is queued already).
        loop {
            let now = runs.get(&id).await.map_err(|e| e.to_string())?;
            if now.status != RunStatus::Waiting {
                break;
            }
            let parked = now.parked.unwrap_or_default();
            let wake_at = parked.wake_at().unwrap_or_else(chrono::Utc::now);
            let left = (wake_at - chrono::Utc::now()).to_std().unwrap_or_default();
            let waits_for_signal = parked.waits.iter().any(|w| w.signal.is_some());
            tokio::select! {
                () = cancel.cancelled() => {
                    let change = RunStatus::Waiting.to(RunStatus::Cancelled);
                    return runs.transition(&id, change).await.map_err(|e| e.to_string());
                }
                () = tokio::time::sleep(left) => {
                    let due = Due { after: None, by: chrono::Utc::now(), limit: 1 };
                    runs.wake_due(&due).await.map_err(|e| e.to_string())?;
                }
                line = stdin.next_line(), if waits_for_signal && stdin_open => {
                    match line.map_err(|e| format!("reading stdin: {e}"))? {
                        None => {
                            stdin_open = false;
                            eprintln!(
                                "stdin is closed: the run waits until its deadline ({wake_at}) \
                                 unless a signal comes; give signals with --signal"
                            );
                        }
                        Some(Err(e)) => eprintln!("stdin: {e}; give NAME JSON"),
                        Some(Ok(line)) if line.trim().is_empty() => {}
                        Some(Ok(line)) => match parse_signal(&line, ' ') {
                            Ok((name, payload)) => {
                                send(&name, &payload).await?;
                            }
                            Err(e) => eprintln!("stdin: {e}; give NAME JSON"),
                        },
                    }
                }
            }
        }
        run = runs
            .claim_run(&id, &options.owner, options.lease_ttl)
            .await
            .map_err(|e| e.to_string())?;
    }
}

async fn load_flows(store: &dyn FlowStore, dir: &Path) -> Result<(), String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
            .path();
        if path.extension().is_some_and(|x| x == "json") {
            let (flow, _) = read_flow(&path).map_err(|e| e.message(&path))?;
            if flow.id.is_none() {
                return Err(format!(
                    "{}: a flow in --flows-dir needs an id",
                    path.display()
                ));
            }
            store
                .create(&flow)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}

fn progress(event: &RunEvent, started: Instant) {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match event {
        RunEvent::NodeStarted { node, attempt, .. } if *attempt > 1 => {
            eprintln!("{ms:9.1} ms  {node}: retry, attempt {attempt}");
        }
        RunEvent::NodeStarted { node, .. } => eprintln!("{ms:9.1} ms  {node}: started"),
        RunEvent::NodeFinished {
            node,
            status,
            error,
            ..
        } => match error {
            Some(error) => eprintln!("{ms:9.1} ms  {node}: {status}: {error}"),
            None => eprintln!("{ms:9.1} ms  {node}: {status}"),
        },
        RunEvent::RunFinished { status, .. } => eprintln!("{ms:9.1} ms  run {status}"),
        RunEvent::RunWaiting { waits, .. } => {
            for wait in waits {
                match &wait.signal {
                    Some(signal) => eprintln!(
                        "{ms:9.1} ms  {}: waiting for signal `{signal}` until {} (type `{signal} JSON`)",
                        wait.node, wait.deadline
                    ),
                    None => eprintln!(
                        "{ms:9.1} ms  {}: sleeping until {}",
                        wait.node, wait.deadline
                    ),
                }
            }
        }
        RunEvent::RunResumed { .. } => eprintln!("{ms:9.1} ms  run resumed"),
        RunEvent::ItemsDone {
            node, total, done, ..
        } => eprintln!("{ms:9.1} ms  {node}: {done} of {total} items done"),
        _ => {}
    }
}
