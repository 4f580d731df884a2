//! The real binary against clients that hold connections: idle sockets, slow downloads. Every
//! loop here is bounded in count and time; only loopback is used.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const KEY: &str = "connections-test-key";

include!("common/http.rs");

struct Server {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Server {
    fn start(env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("flowcore-conn-{}", flowcore::ids::new_id()));
        let mut vars = vec![("STORAGE_TYPE", "fs")];
        vars.extend(env.iter().copied());
        let server = Self {
            child: serve_command(port, &dir, &vars, None)
                .spawn()
                .expect("spawn"),
            port,
            dir,
        };
        wait_until_up(port);
        server
    }

    fn connect(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port)).expect("connect")
    }

    /// A request on a fresh connection: the status, or `None` without an answer in 10 s.
    fn send(&self, head: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        let mut sock = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        sock.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        sock.write_all(head.as_bytes()).ok()?;
        sock.write_all(body).ok()?;
        let mut out = Vec::new();
        sock.read_to_end(&mut out).ok()?;
        let status = std::str::from_utf8(out.get(9..12)?).ok()?.parse().ok()?;
        Some((status, out))
    }

    fn get(&self, path: &str) -> Option<u16> {
        http_request(self.port, "GET", path, None).map(|(status, _)| status)
    }

    /// The server's resident memory, in MB.
    fn rss_mb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb / 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn idle_connections_are_closed_and_capped_and_health_still_answers() {
    let server = Server::start(&[
        ("FLOWCORE_MAX_CONNECTIONS", "20"),
        ("FLOWCORE_HEADER_TIMEOUT_SECONDS", "1"),
    ]);
    // The open-file limit was raised to its hard limit.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(files[3], files[4], "soft = hard: {files:?}");

    // Three times the cap in idle sockets, one with half a request.
    let mut idle: Vec<TcpStream> = (0..60).map(|_| server.connect()).collect();
    idle[0].write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    // A new client still gets its answer once the idle ones are let go.
    let asked = Instant::now();
    assert_eq!(server.get("/healthz"), Some(200));
    assert!(asked.elapsed() < Duration::from_secs(10));
    // And the idle ones were closed by the server (a read sees the end, not a timeout).
    for sock in idle.iter_mut().take(5) {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let read = sock.read(&mut buf);
        assert!(
            read.is_ok(),
            "an idle connection is closed by the server: {read:?}"
        );
    }
}

#[test]
fn slow_downloads_are_streamed_not_held_in_memory() {
    let server = Server::start(&[("MAX_FILE_SIZE_MB", "25")]);
    let size = 16 * 1024 * 1024;
    let file = vec![b'x'; size];
    let (status, answer) = server
        .send(
            &format!(
                "POST /api/v1/files?name=big.bin HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\ncontent-type: application/octet-stream\r\ncontent-length: {size}\r\nConnection: close\r\n\r\n"
            ),
            &file,
        )
        .expect("uploaded");
    assert_eq!(status, 201);
    let answer = String::from_utf8_lossy(&answer);
    let id = answer
        .split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a file id")
        .to_owned();
    let before = server.rss_mb();
    // Twenty clients that ask and read almost nothing: a server that reads the whole file
    // first holds twenty copies (320 MB).
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut sock = server.connect();
        write!(
            sock,
            "GET /api/v1/files/{id} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 1024];
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let n = sock.read(&mut head).unwrap();
        let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        slow.push(sock);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = server.rss_mb().saturating_sub(before);
    assert!(
        grown < 120,
        "memory grew by {grown} MB for 20 slow downloads"
    );
}
