// `flowcore serve` as a child process, and plain HTTP/1.1 to it on loopback (one connection a
// request), for the tests that run the real binary (`processes.rs`, `faults.rs`, `connections.rs`). Each test
// crate that includes it defines `KEY`, the admin key its processes run with.

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One request with the admin key: the status and the whole answer (head and body), `None`
/// when the connection failed or no answer came within 20 s.
fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .ok()?;
    let body = body.map(serde_json::Value::to_string).unwrap_or_default();
    write!(
        sock,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    sock.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    Some((status, out))
}

/// The JSON body of an answer of [`http_request`] (`null` when there is none).
#[allow(dead_code)] // (not every including test reads bodies)
fn json_body(answer: &str) -> serde_json::Value {
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// `flowcore serve` on `port` with the data dir `dir`, the admin key and `env`, its output to
/// `log` (or nowhere): not started yet.
#[allow(dead_code)] // (the fault suite starts its processes through a script of its own)
fn serve_command(
    port: u16,
    dir: &std::path::Path,
    env: &[(&str, &str)],
    log: Option<&std::path::Path>,
) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_flowcore"));
    command
        .arg("serve")
        .env("FLOWCORE_BIND", format!("127.0.0.1:{port}"))
        .env("FLOWCORE_DATA_DIR", dir)
        .env("FLOWCORE_ADMIN_KEY", KEY)
        .stdout(std::process::Stdio::null())
        .stderr(match log {
            Some(path) => std::process::Stdio::from(std::fs::File::create(path).expect("a log")),
            None => std::process::Stdio::null(),
        })
        .envs(env.iter().copied());
    command
}

/// Waits up to 20 s for the process on `port` to answer `/healthz`.
#[allow(dead_code)]
fn wait_until_up(port: u16) {
    let started = std::time::Instant::now();
    while http_request(port, "GET", "/healthz", None).is_none() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
