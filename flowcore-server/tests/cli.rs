//! The `flowcore` binary: `validate` and `run`, driven as a user would.

use std::io::Write;
use std::process::{Command, Output};

fn flowcore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowcore"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_file(content: &[u8]) -> tempfile_path::TempPath {
    tempfile_path::TempPath::with(content)
}

/// A file in the temp dir removed on drop (std only, to keep dev-dependencies lean).
mod tempfile_path {
    use super::Write;
    use std::path::PathBuf;

    pub struct TempPath(pub PathBuf);

    impl TempPath {
        pub fn with(content: &[u8]) -> Self {
            let path = std::env::temp_dir().join(format!("flowcore-cli-{}.json", uuid_like()));
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(content))
                .expect("write temp file");
            Self(path)
        }
        pub fn arg(&self) -> &str {
            self.0.to_str().expect("utf-8 path")
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn uuid_like() -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        )
    }
}

const GREET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/flows/greet.json");

#[test]
fn validate_says_ok_for_a_good_flow() {
    let out = flowcore(&["validate", GREET]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), "ok");
}

#[test]
fn validate_lists_every_problem_one_a_line() {
    let bad = temp_file(
        br#"{"nodes": [{"id": "a", "type": "nope"}, {"id": "b", "type": "noop"}],
            "edges": [{"from": "b", "to": "b"}, {"from": "a", "to": "ghost"}]}"#,
    );
    let out = flowcore(&["validate", bad.arg()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines.iter().any(|l| l.contains("unknown node type `nope`")));
    assert!(lines.iter().any(|l| l.contains("cycle: b -> b")));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("edge 1 (line 2, column ")
                && l.ends_with("): edge to missing node `ghost`"))
    );
}

#[test]
fn bad_files_get_a_message_not_a_panic() {
    let out = flowcore(&["validate", "/no/such/file.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read /no/such/file.json"));

    let garbage = temp_file(b"\xff\xfe not json");
    let out = flowcore(&["validate", garbage.arg()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not valid JSON: expected value at line 1 column 1"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stderr).contains("panicked"));

    let unknown = temp_file(br#"{"nodes": [], "colour": "blue"}"#);
    let out = flowcore(&["run", unknown.arg()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("unknown field `colour`"));
}

#[test]
fn run_prints_the_output_and_progress() {
    let out = flowcore(&["run", GREET, "--input", r#"{"name": "ada", "n": 7}"#]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let output: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(output, serde_json::json!({"path": "a", "msg": "hello ada"}));
    let progress = text(&out.stderr);
    assert!(progress.contains("hello: started"), "{progress}");
    assert!(progress.contains("b: skipped"), "{progress}");
    assert!(progress.contains("run succeeded"), "{progress}");
}

#[test]
fn run_failures_exit_1_with_the_error() {
    let failing = temp_file(
        br#"{"nodes": [{"id": "s", "type": "script", "params": {"source": "throw \"bad day\""}}]}"#,
    );
    let out = flowcore(&["run", failing.arg(), "--quiet"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("run failed: node `s` failed: the script threw: bad day"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());

    let out = flowcore(&["run", GREET, "--input", "{not json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--input is not valid JSON"));
}

#[test]
fn subflows_come_from_a_flows_dir() {
    let dir = std::env::temp_dir().join(format!("flowcore-cli-flows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("child.json"),
        br#"{"id": "child", "nodes": [{"id": "t", "type": "template", "params": {"template": "child of {{ input.who }}"}}]}"#,
    )
    .unwrap();
    let parent = temp_file(
        br#"{"nodes": [{"id": "call", "type": "subflow", "params": {"flow_id": "child"}}]}"#,
    );
    let run = |flow: &str, input: &str| {
        flowcore(&[
            "run",
            flow,
            "--flows-dir",
            dir.to_str().unwrap(),
            "--input",
            input,
        ])
    };
    let out = run(parent.arg(), r#"{"who": "x"}"#);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), r#""child of x""#);

    // A map runs the stored child once per item, and says how far it got.
    let each = temp_file(
        br#"{"nodes": [{"id": "each", "type": "map", "params": {"items": "{{ input.names }}", "flow_id": "child", "input": {"who": "{{ item }}"}}}]}"#,
    );
    let out = run(each.arg(), r#"{"names": ["a", "b"]}"#);
    std::fs::remove_dir_all(&dir).ok();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let output: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(output, serde_json::json!(["child of a", "child of b"]));
    assert!(
        text(&out.stderr).contains("each: 2 of 2 items done"),
        "{}",
        text(&out.stderr)
    );
}

/// A `wait` takes its signal from `--signal` or from stdin; a long `delay` sleeps in the
/// process and the run goes on after it.
#[test]
fn run_takes_signals_from_the_command_line_and_stdin_and_sleeps_long_delays() {
    let flow = temp_file(
        br#"{"nodes": [
            {"id": "approve", "type": "wait", "params": {"signal": "approve", "timeout_ms": 60000}},
            {"id": "nap", "type": "delay", "params": {"ms": 1100}},
            {"id": "done", "type": "template", "params": {"template": "{{ nodes.approve.by }} {{ run.id | length }}"}}
        ], "edges": [{"from": "approve", "to": "nap"}, {"from": "nap", "to": "done"}]}"#,
    );
    let started = std::time::Instant::now();
    let out = flowcore(&["run", flow.arg(), "--signal", r#"approve={"by": "ada"}"#]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), r#""ada 36""#);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1100),
        "the delay was slept"
    );
    assert!(
        text(&out.stderr).contains("nap: sleeping until"),
        "{}",
        text(&out.stderr)
    );

    // `flowcore run` with stdin, stdout and stderr piped.
    let piped = || {
        Command::new(env!("CARGO_BIN_EXE_flowcore"))
            .args(["run", flow.arg()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let mut child = piped();
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"approve {\"by\": \"bob\"}\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), r#""bob 36""#);

    // A line past the bound (a signal's 256 KiB and its name) and a line that is not UTF-8
    // are each left out with a message, unkept; the run waits on for a good one.
    let mut child = piped();
    let mut input = b"approve \"".to_vec();
    input.extend(std::iter::repeat_n(b'x', 8 * 1024 * 1024));
    input.extend_from_slice(b"\"\napprove \xff\xfe\napprove {\"by\": \"cy\"}\n");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("writer").expect("write");
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(text(&out.stdout).trim(), r#""cy 36""#);
    assert!(err.contains("a line longer than"), "{err}");
    assert!(err.contains("not UTF-8"), "{err}");

    let bad = flowcore(&["run", flow.arg(), "--signal", "approve"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("give NAME=JSON"),
        "{}",
        text(&bad.stderr)
    );
}

/// A `wait` whose signal never comes fails the run at its timeout, stdin closed or not.
#[test]
fn run_fails_a_wait_past_its_timeout() {
    let flow = temp_file(
        br#"{"nodes": [{"id": "w", "type": "wait", "params": {"signal": "never", "timeout_ms": 1200}}]}"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_flowcore"))
        .args(["run", flow.arg()])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no signal `never` came"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn serve_says_it_listens_once_and_logs_to_a_pipe_without_colours() {
    use std::io::{BufRead, Read};
    let dir = std::env::temp_dir().join(format!("flowcore-cli-serve-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowcore"))
        .arg("serve")
        .env("FLOWCORE_DATA_DIR", &dir)
        .env("FLOWCORE_BIND", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut text = String::new();
    // Bounded: the server logs a few lines before it listens.
    for _ in 0..200 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        text.push_str(&line);
        if line.contains("listening") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = stderr.read_to_string(&mut text);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(text.matches("listening on http://").count(), 1, "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "no ANSI colours in a pipe: {text:?}"
    );
}

/// A database that cannot be reached says why, not only where.
#[test]
fn a_database_that_refuses_says_why() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowcore"))
        .arg("migrate")
        .env(
            "DATABASE_URL",
            "postgres://postgres:secret@127.0.0.1:1/nowhere",
        )
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "the cause: {err}");
    assert!(!err.contains("secret"), "no password: {err}");
}

#[test]
fn serve_help_names_the_log_filter() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowcore"))
        .args(["serve", "--help"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(
        help.contains("RUST_LOG") && help.contains("FLOWCORE_ADMIN_KEY"),
        "{help}"
    );
}

#[test]
fn validate_lists_every_typo_with_its_line_and_column() {
    let flow = temp_file(
        br#"{"nodes": [
  {"id": "a", "type": "noop", "retyr": {}},
  {"id": "b", "type": "nope", "on_eror": "continue"}
]}"#,
    );
    let out = Command::new(env!("CARGO_BIN_EXE_flowcore"))
        .args(["validate", flow.arg()])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0]
            .starts_with("node `a` (line 2, column 40): `nodes[0].retyr`: unknown field `retyr`"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(
            "node `b` (line 3, column 42): `nodes[1].on_eror`: unknown field `on_eror`"
        ),
        "{stdout}"
    );

    // The compiler's problems are placed too: the unknown type, at its node.
    let flow = temp_file(b"{\"nodes\": [\n  {\"id\": \"a\", \"type\": \"noop\"},\n  {\"id\": \"b\", \"type\": \"nope\"}\n]}");
    let out = flowcore(&["validate", flow.arg()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).starts_with("node `b` (line 3, column 3): unknown node type `nope`"),
        "{}",
        text(&out.stdout)
    );
}

/// A Redis that cannot be reached is named (its password hidden), with the cause.
#[test]
fn a_redis_that_refuses_is_named_with_the_cause() {
    let dir = std::env::temp_dir().join(format!("flowcore-cli-redis-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_flowcore"))
        .arg("serve")
        .env("FLOWCORE_DATA_DIR", &dir)
        .env("FLOWCORE_BIND", "127.0.0.1:0")
        .env("REDIS_URL", "redis://:secretpw@127.0.0.1:1")
        .output()
        .expect("runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("redis://:***@127.0.0.1:1"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "the cause: {err}");
    assert!(!err.contains("secretpw"), "no password: {err}");
}
