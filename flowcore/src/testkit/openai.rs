//! A stand-in for an OpenAI-compatible chat completions server, on loopback, for the tests of
//! `llm_chat`: it answers `POST /v1/chat/completions` as its script says, with the wire format of
//! the OpenAI API reference (`chat.completion.chunk` events over `text/event-stream`, a final
//! usage chunk when `stream_options.include_usage` is set, `data: [DONE]`), and records every
//! request. The server's tests check this format with the official `openai` Python client.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use flowcore::testkit::openai::{FakeLlm, Reply};
//! let server = FakeLlm::start(|_request| Reply::text("m", &["Hel", "lo"])).await;
//! assert!(server.base_url().starts_with("http://127.0.0.1:"));
//! # });
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Request {
    /// The JSON body.
    pub body: Value,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The request path.
    pub path: String,
}

/// What the server answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A `200` streamed answer: each string is one event's `data` (a chunk's JSON), sent
    /// `gap` apart, then `data: [DONE]` unless `cut` (the connection then closes mid-answer).
    Stream {
        /// The events' data, in order.
        events: Vec<String>,
        /// The pause before each event.
        gap: Duration,
        /// Close the connection after the events, without `[DONE]` and in the middle of a
        /// last event (half of a chunk's JSON).
        cut: bool,
    },
    /// An error status with a JSON body and, maybe, `Retry-After`.
    Status {
        /// The status code.
        code: u16,
        /// The `Retry-After` header.
        retry_after: Option<String>,
        /// The body.
        body: Value,
    },
}

/// The `chat.completion.chunk` of a delta, as the reference shows it.
pub fn chunk(model: &str, delta: Value, finish_reason: Option<&str>) -> String {
    json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": model, "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]
    })
    .to_string()
}

/// The final usage chunk (`choices` empty), sent when `include_usage` is asked for.
pub fn usage_chunk(model: &str, prompt: u64, completion: u64) -> String {
    json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": model, "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
    })
    .to_string()
}

impl Reply {
    /// A streamed text answer in `parts`, with usage (10 prompt tokens, one per part).
    pub fn text(model: &str, parts: &[&str]) -> Self {
        let mut events = vec![chunk(
            model,
            json!({"role": "assistant", "content": ""}),
            None,
        )];
        events.extend(
            parts
                .iter()
                .map(|p| chunk(model, json!({"content": p}), None)),
        );
        events.push(chunk(model, json!({}), Some("stop")));
        events.push(usage_chunk(model, 10, parts.len() as u64));
        Self::Stream {
            events,
            gap: Duration::ZERO,
            cut: false,
        }
    }

    /// A streamed answer asking for tool calls `(id, name, arguments)`, each call's arguments
    /// split into pieces of `piece` bytes across chunks, as servers stream them.
    pub fn tool_calls(model: &str, calls: &[(&str, &str, &str)], piece: usize) -> Self {
        let mut events = vec![chunk(
            model,
            json!({"role": "assistant", "content": null}),
            None,
        )];
        for (index, (id, name, arguments)) in calls.iter().enumerate() {
            events.push(chunk(
                model,
                json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                None,
            ));
            let bytes = arguments.as_bytes();
            for part in bytes.chunks(piece.max(1)) {
                let part = String::from_utf8_lossy(part);
                events.push(chunk(
                    model,
                    json!({"tool_calls": [{"index": index, "function": {"arguments": part}}]}),
                    None,
                ));
            }
        }
        events.push(chunk(model, json!({}), Some("tool_calls")));
        events.push(usage_chunk(model, 20, 5));
        Self::Stream {
            events,
            gap: Duration::ZERO,
            cut: false,
        }
    }

    /// The same stream with `gap` before each event.
    pub fn slowly(self, gap: Duration) -> Self {
        match self {
            Self::Stream { events, cut, .. } => Self::Stream { events, gap, cut },
            other => other,
        }
    }

    /// A `429` with `Retry-After: seconds`, as OpenAI's rate limits answer.
    pub fn rate_limited(seconds: &str) -> Self {
        Self::Status {
            code: 429,
            retry_after: Some(seconds.to_owned()),
            body: json!({"error": {"message": "Rate limit reached for requests",
                "type": "requests", "param": null, "code": "rate_limit_exceeded"}}),
        }
    }
}

/// The stand-in server. It stops when dropped.
pub struct FakeLlm {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeLlm")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLlm {
    /// Starts the server on a free loopback port; `script` answers each request (the
    /// requests so far, this one last, are passed to it).
    pub async fn start(script: impl Fn(&[Request]) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (script, seen) = (script.clone(), seen.clone());
                tokio::spawn(async move {
                    let _ = serve(socket, &*script, &seen).await;
                });
            }
        });
        Self {
            port,
            requests,
            task,
        }
    }

    /// `http://127.0.0.1:<port>/v1`, what a flow's `base_url` names.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The requests received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("requests").clone()
    }
}

/// Serves the requests of one connection (keep-alive), each as the script says.
async fn serve(
    socket: tokio::net::TcpStream,
    script: &(dyn Fn(&[Request]) -> Reply + Send + Sync),
    seen: &Mutex<Vec<Request>>,
) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut first = String::new();
        if reader.read_line(&mut first).await? == 0 {
            return Ok(());
        }
        let path = first.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (mut length, mut authorization) = (0usize, None);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "authorization" => authorization = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length.min(16 << 20)];
        reader.read_exact(&mut body).await?;
        let request = Request {
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            authorization,
            path,
        };
        let reply = {
            let mut all = seen.lock().expect("requests");
            all.push(request);
            script(&all)
        };
        match reply {
            Reply::Status {
                code,
                retry_after,
                body,
            } => {
                let body = body.to_string();
                let mut head = format!(
                    "HTTP/1.1 {code} Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    body.len()
                );
                if let Some(after) = retry_after {
                    head.push_str(&format!("retry-after: {after}\r\n"));
                }
                head.push_str("\r\n");
                write.write_all(head.as_bytes()).await?;
                write.write_all(body.as_bytes()).await?;
            }
            Reply::Stream { events, gap, cut } => {
                write
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
                    )
                    .await?;
                let send = async |write: &mut tokio::net::tcp::OwnedWriteHalf, text: &str| {
                    let framed = format!("{:x}\r\n{text}\r\n", text.len());
                    write.write_all(framed.as_bytes()).await?;
                    write.flush().await
                };
                for event in &events {
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                    send(&mut write, &format!("data: {event}\n\n")).await?;
                }
                if cut {
                    let half = &events.last().map_or("{", |e| &e[..e.len() / 2]);
                    send(&mut write, &format!("data: {half}")).await?;
                    return Ok(());
                }
                send(&mut write, "data: [DONE]\n\n").await?;
                write.write_all(b"0\r\n\r\n").await?;
            }
        }
    }
}
