//! The web console in a real browser: `flowcore serve` on the embedded defaults, a stand-in
//! OpenAI server that streams slowly, and `tests/console/console.test.mjs` driving Debian's
//! Chromium through playwright-core. It signs in, opens a flow and its DAG, edits it, starts a
//! run and watches it turn green, reruns a failed run, approves a waiting one, reads streamed
//! tokens, and checks that run data holding HTML shows as text.
//!
//! Needs Node.js, `npm ci --prefix flowcore-server/tests/console`, and `chromium` (`.ci/run`
//! installs what is missing). Screenshots of every page go to
//! `$CARGO_TARGET_DIR/tmp/console-screenshots` (or `FLOWCORE_SCREENSHOTS`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flowcore::testkit::openai::{FakeLlm, Reply};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `flowcore serve` on a free loopback port; its address from the "listening" line.
fn serve(dir: &std::path::Path, key: &str) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowcore"))
        .arg("serve")
        .env("FLOWCORE_DATA_DIR", dir)
        .env("FLOWCORE_BIND", "127.0.0.1:0")
        .env("FLOWCORE_ADMIN_KEY", key)
        .env("FLOWCORE_HTTP_ALLOW", "127.0.0.1/32")
        .env("RUST_LOG", "warn,flowcore_server=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flowcore serve starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut address = None;
    // Bounded: the server logs a few lines before it listens.
    for _ in 0..200 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(at) = line.find("http://") {
            let url: String = line[at..]
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '"')
                .collect();
            address = Some(url.trim_end_matches('/').to_owned());
            break;
        }
    }
    // Keep reading its log so the pipe never fills.
    std::thread::spawn(move || {
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap_or(0) > 0 {
            line.clear();
        }
    });
    let address = address.expect("the server says where it listens");
    (Server(child), address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console");
    assert!(
        here.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: run `npm ci --prefix flowcore-server/tests/console` (.ci/run does)"
    );
    let chromium =
        std::env::var("FLOWCORE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: `apt-get install chromium` (.ci/run does), or set FLOWCORE_CHROMIUM"
    );
    let llm = FakeLlm::start(|_| {
        Reply::text(
            "fake-1",
            &[
                "Hello", ", ", "Ada", "!", " How", " can", " I", " help", " today", "?",
            ],
        )
        .slowly(Duration::from_millis(250))
    })
    .await;
    let dir = std::env::temp_dir().join(format!("flowcore-console-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let key = "fc_console_test_admin_key_0123456789";
    let (server, url) = serve(&dir, key);
    let shots = std::env::var("FLOWCORE_SCREENSHOTS").map_or_else(
        |_| {
            let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
                |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
                PathBuf::from,
            );
            target.join("tmp/console-screenshots")
        },
        PathBuf::from,
    );
    let llm_url = llm.base_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(std::env::var("FLOWCORE_NODE").unwrap_or_else(|_| "node".into()))
            .arg("console.test.mjs")
            .current_dir(&here)
            .env("FLOWCORE_URL", &url)
            .env("FLOWCORE_KEY", key)
            .env("FLOWCORE_LLM_URL", &llm_url)
            .env("SCREENSHOTS", &shots)
            .env("CHROMIUM", &chromium)
            .output()
            .expect("node starts (install Node.js, or set FLOWCORE_NODE)")
    })
    .await
    .expect("the browser test ran");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("# the console passed"), "{stdout}");
}
