//! `llm_chat`: a chat completion from any server of the OpenAI-compatible API (OpenAI, Azure
//! OpenAI, Ollama, vLLM, llama.cpp's server, LM Studio, OpenRouter), streamed.
//!
//! Each call is `POST {base_url}/chat/completions` with `stream: true` and
//! `stream_options.include_usage`; every piece of the answer goes out as a `token` event as it
//! arrives. Tools are flows: a tool call runs the named flow with the call's arguments as its
//! input (checked against the tool's `parameters` schema) and sends its output back, until the
//! model answers or `max_iterations` model calls were made. Each finished model call and tool
//! run is checkpointed (in a durable execution), so a resumed run pays for none of them again.
//!
//! The server is reached through the engine's guarded client: the same deny list as
//! `http_request` (a local model server needs `FLOWCORE_HTTP_ALLOW`), no redirects, no proxy.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::parse_params;
use crate::error::{NodeError, ParamError};
use crate::event::RunEvent;
use crate::expr::{References, Template};
use crate::model::{RetryPolicy, is_valid_id};
use crate::node::{Node, NodeContext, Output};
use crate::run::{ItemProgress, RunStatus};

const DEFAULT_TIMEOUT_MS: u64 = 120_000;
const MAX_TIMEOUT_MS: u64 = 600_000;
const DEFAULT_MAX_ITERATIONS: u32 = 5;
const MAX_ITERATIONS: u32 = 50;
const MAX_TOOLS: usize = 64;
/// Tool calls one answer may ask for.
const MAX_TOOL_CALLS: usize = 32;
/// The longest `Retry-After` the node waits for; a longer one fails the node.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The longest line of the stream (one event of a few tokens is well under a kilobyte).
const MAX_LINE: usize = 1 << 20;
/// Token events of one model call, one a piece; after them pieces are gathered.
const EVENTS_A_CALL: usize = 4_096;
/// The least bytes of a gathered token event.
const GATHERED: usize = 4_096;
/// The largest tool output sent back to the model (a larger one is an error for it).
const MAX_TOOL_OUTPUT: usize = 1 << 20;
/// How much of an error answer's body is read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

struct LlmChat {
    base_url: Template,
    model: Template,
    messages: Vec<(String, Template)>,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    /// As sent, and the schema an answer must match (`json_schema`).
    response_format: Option<(Value, Format)>,
    credential: Option<String>,
    literal_origin: Option<url::Origin>,
    timeout: Duration,
    tools: Vec<Tool>,
    max_iterations: u32,
}

/// What the answer must be.
enum Format {
    Text,
    Json,
    Schema(Box<jsonschema::Validator>),
}

struct Tool {
    name: String,
    flow_id: String,
    description: Option<String>,
    parameters: Value,
    validator: Box<jsonschema::Validator>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    base_url: String,
    model: String,
    messages: Vec<MessageParam>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    response_format: Option<Value>,
    /// The name of a stored `bearer` credential (literal, as for `http_request`).
    #[serde(default)]
    credential: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    tools: Vec<ToolParam>,
    #[serde(default)]
    max_iterations: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageParam {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolParam {
    name: String,
    flow_id: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
}

/// A JSON Schema validator; `$ref`s to other documents are not fetched (nothing is
/// resolved over the network or from files), and patterns use the linear-time `regex`.
fn validator(schema: &Value) -> Result<Box<jsonschema::Validator>, String> {
    jsonschema::options()
        .with_pattern_options(jsonschema::PatternOptions::regex())
        .build(schema)
        .map(Box::new)
        .map_err(|e| e.to_string())
}

/// The first few ways `value` breaks `schema`, as one message.
fn violations(validator: &jsonschema::Validator, value: &Value) -> Option<String> {
    let errors: Vec<String> = validator
        .iter_errors(value)
        .take(5)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("at {at}: {e}")
            }
        })
        .collect();
    (!errors.is_empty()).then(|| errors.join("; "))
}

fn is_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub(crate) fn build(params: &Value) -> Result<Box<dyn Node>, ParamError> {
    let p: Params = parse_params(params)?;
    let template = |text: &str, what: &str| {
        Template::compile(text).map_err(|e| ParamError::new(format!("{what}: {e}")))
    };
    let base_url = template(&p.base_url, "base_url")?;
    if base_url.is_literal() {
        let url =
            url::Url::parse(&p.base_url).map_err(|e| ParamError::new(format!("base_url: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ParamError::new("base_url: only http and https are allowed"));
        }
    }
    if p.messages.is_empty() {
        return Err(ParamError::new("messages: at least one message is needed"));
    }
    let messages = p
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant"
            ) {
                return Err(ParamError::new(format!(
                    "messages[{i}].role: `{}` is not system, developer, user or assistant",
                    m.role
                )));
            }
            Ok((
                m.role.clone(),
                template(&m.content, &format!("messages[{i}].content"))?,
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(t) = p.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ParamError::new("temperature must be between 0 and 2"));
    }
    if p.max_tokens == Some(0) {
        return Err(ParamError::new("max_tokens must be at least 1"));
    }
    let response_format = p
        .response_format
        .map(|rf| -> Result<(Value, Format), ParamError> {
            let format = match rf.get("type").and_then(Value::as_str) {
                Some("text") => Format::Text,
                Some("json_object") => Format::Json,
                Some("json_schema") => {
                    let schema = rf.pointer("/json_schema/schema").ok_or_else(|| {
                        ParamError::new("response_format.json_schema.schema is missing")
                    })?;
                    if rf
                        .pointer("/json_schema/name")
                        .and_then(Value::as_str)
                        .is_none()
                    {
                        return Err(ParamError::new(
                            "response_format.json_schema.name is missing",
                        ));
                    }
                    Format::Schema(validator(schema).map_err(|e| {
                        ParamError::new(format!("response_format.json_schema.schema: {e}"))
                    })?)
                }
                _ => {
                    return Err(ParamError::new(
                        "response_format.type must be text, json_object or json_schema",
                    ));
                }
            };
            Ok((rf, format))
        })
        .transpose()?;
    let timeout_ms = p.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(ParamError::new(format!(
            "timeout_ms must be between 1 and {MAX_TIMEOUT_MS}"
        )));
    }
    if p.tools.len() > MAX_TOOLS {
        return Err(ParamError::new(format!("tools: at most {MAX_TOOLS}")));
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(p.tools.len());
    for (i, t) in p.tools.into_iter().enumerate() {
        if !is_tool_name(&t.name) {
            return Err(ParamError::new(format!(
                "tools[{i}].name: 1 to 64 letters, digits, `_` or `-`"
            )));
        }
        if tools.iter().any(|o| o.name == t.name) {
            return Err(ParamError::new(format!(
                "tools[{i}].name: `{}` is named twice",
                t.name
            )));
        }
        if !is_valid_id(&t.flow_id) {
            return Err(ParamError::new(format!(
                "tools[{i}].flow_id: not a valid flow id"
            )));
        }
        let parameters = t
            .parameters
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        let validator = validator(&parameters)
            .map_err(|e| ParamError::new(format!("tools[{i}].parameters: {e}")))?;
        tools.push(Tool {
            name: t.name,
            flow_id: t.flow_id,
            description: t.description,
            parameters,
            validator,
        });
    }
    let max_iterations = p.max_iterations.unwrap_or(DEFAULT_MAX_ITERATIONS);
    if !(1..=MAX_ITERATIONS).contains(&max_iterations) {
        return Err(ParamError::new(format!(
            "max_iterations must be between 1 and {MAX_ITERATIONS}"
        )));
    }
    Ok(Box::new(LlmChat {
        literal_origin: super::http::literal_origin(&p.base_url),
        base_url,
        model: template(&p.model, "model")?,
        messages,
        temperature: p.temperature,
        max_tokens: p.max_tokens,
        response_format,
        credential: p.credential,
        timeout: Duration::from_millis(timeout_ms),
        tools,
        max_iterations,
    }))
}

/// Token counts, summed over a node's model calls.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// The most tokens one model call is counted for, of each kind: a server's number past it is
/// a lie that would overflow the counters (and a quota's arithmetic) downstream.
const MAX_TOKENS_A_CALL: u64 = 1_000_000_000;

impl Usage {
    /// The counts as the server told them, each at most [`MAX_TOKENS_A_CALL`].
    fn bounded(self) -> Self {
        Self {
            prompt_tokens: self.prompt_tokens.min(MAX_TOKENS_A_CALL),
            completion_tokens: self.completion_tokens.min(MAX_TOKENS_A_CALL),
        }
    }

    fn add(&mut self, other: Self) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
    }
}

/// One `data:` event of the stream: a `chat.completion.chunk`, or an `error`.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default)]
    index: usize,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

/// A tool call as the stream assembled it.
#[derive(Debug, Default, Clone)]
struct Call {
    id: String,
    name: String,
    arguments: String,
}

/// One model call's answer, as the stream assembled it.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    content: String,
    refusal: String,
    model: Option<String>,
    finish_reason: Option<String>,
    calls: Vec<Call>,
    usage: Option<Usage>,
    done: bool,
}

/// Reads the `text/event-stream` framing of an answer: `data:` lines, blank lines between
/// events, `:` comments. Written here rather than taken from a crate: the framing that
/// OpenAI-compatible servers send is these few rules, and the per-token cost stays a line
/// split and one JSON parse.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    /// Bytes of a line not finished yet.
    line: Vec<u8>,
    /// The `data` of the event being read.
    data: String,
    /// Bytes of answer content and tool arguments so far, against the output limit.
    bytes: usize,
    pub(crate) answer: Answer,
}

impl Stream {
    /// Feeds bytes as they come; `on_delta` sees each piece of content.
    pub(crate) fn feed(
        &mut self,
        mut bytes: &[u8],
        limit: usize,
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<(), NodeError> {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let (head, rest) = bytes.split_at(end);
            bytes = &rest[1..];
            if self.line.is_empty() {
                self.line_done(head, limit, on_delta)?;
            } else {
                // A line split across reads: joined in the buffer, which is kept.
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.line_done(&line, limit, on_delta)?;
                line.clear();
                self.line = line;
            }
        }
        if self.line.len() + bytes.len() > MAX_LINE {
            return Err(NodeError::fatal(format!(
                "malformed stream from the model server: a line longer than {MAX_LINE} bytes"
            )));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// The end of the body: what is left is one last event.
    pub(crate) fn finish(
        &mut self,
        limit: usize,
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<(), NodeError> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, limit, on_delta)?;
        }
        self.dispatch(limit, on_delta)
    }

    fn line_done(
        &mut self,
        line: &[u8],
        limit: usize,
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<(), NodeError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return self.dispatch(limit, on_delta);
        }
        let line = std::str::from_utf8(line).map_err(|_| {
            NodeError::fatal("malformed stream from the model server: a line is not UTF-8")
        })?;
        if let Some(data) = line.strip_prefix("data:") {
            let data = data.strip_prefix(' ').unwrap_or(data);
            // An event of many `data:` lines and no blank line is one line as far as memory goes.
            if self.data.len() + data.len() > MAX_LINE {
                return Err(NodeError::fatal(format!(
                    "malformed stream from the model server: an event longer than {MAX_LINE} bytes"
                )));
            }
            if !self.data.is_empty() {
                self.data.push('\n');
            }
            self.data.push_str(data);
        }
        // `event:`, `id:`, `retry:` and `:` comments carry nothing an answer needs.
        Ok(())
    }

    fn dispatch(&mut self, limit: usize, on_delta: &mut dyn FnMut(&str)) -> Result<(), NodeError> {
        if self.data.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.data);
        let result = self.event(&data, limit, on_delta);
        // The buffer is kept for the next event.
        self.data = data;
        self.data.clear();
        result
    }

    fn event(
        &mut self,
        data: &str,
        limit: usize,
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<(), NodeError> {
        if data == "[DONE]" {
            self.answer.done = true;
            return Ok(());
        }
        if self.answer.done {
            return Ok(());
        }
        let chunk: Chunk<'_> = serde_json::from_str(data).map_err(|e| {
            NodeError::fatal(format!(
                "malformed stream from the model server: an event is not a completion chunk ({e})"
            ))
        })?;
        if let Some(error) = chunk.error {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_owned);
            return Err(NodeError::retryable(format!(
                "the model server sent an error in the stream: {}",
                clip(&message, 500)
            )));
        }
        let answer = &mut self.answer;
        if let Some(model) = chunk.model
            && answer.model.is_none()
        {
            answer.model = Some(model.into_owned());
        }
        if let Some(usage) = chunk.usage {
            answer.usage = Some(usage);
        }
        // One choice is asked for (`n` is not sent); another index is ignored.
        let Some(choice) = chunk.choices.and_then(|c| c.into_iter().next()) else {
            return Ok(());
        };
        if let Some(reason) = choice.finish_reason {
            answer.finish_reason = Some(reason.into_owned());
        }
        let Some(delta) = choice.delta else {
            return Ok(());
        };
        let mut grow = |n: usize| {
            self.bytes += n;
            if self.bytes > limit {
                Err(NodeError::OutputTooLarge { limit })
            } else {
                Ok(())
            }
        };
        if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
            grow(text.len())?;
            on_delta(&text);
            answer.content.push_str(&text);
        }
        if let Some(text) = delta.refusal {
            grow(text.len())?;
            answer.refusal.push_str(&text);
        }
        for call in delta.tool_calls.unwrap_or_default() {
            if call.index >= MAX_TOOL_CALLS {
                return Err(NodeError::fatal(format!(
                    "the model asked for more than {MAX_TOOL_CALLS} tool calls in one answer"
                )));
            }
            if answer.calls.len() <= call.index {
                answer.calls.resize(call.index + 1, Call::default());
            }
            let slot = &mut answer.calls[call.index];
            if let Some(id) = call.id {
                grow(id.len())?;
                slot.id.push_str(&id);
            }
            if let Some(function) = call.function {
                if let Some(name) = function.name {
                    grow(name.len())?;
                    slot.name.push_str(&name);
                }
                if let Some(arguments) = function.arguments {
                    grow(arguments.len())?;
                    slot.arguments.push_str(&arguments);
                }
            }
        }
        Ok(())
    }
}

fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// How long a `Retry-After` header asks to wait: seconds, or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| Duration::from_secs_f64(seconds.min(1e9)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .to_std()
            .unwrap_or_default(),
    )
}

/// One finished piece of the node's work, as checkpointed.
#[derive(Debug, Clone)]
enum Turn {
    /// A model call's answer: the assistant message sent back with the next call.
    Model {
        message: Value,
        model: Option<String>,
        finish_reason: Option<String>,
        usage: Usage,
    },
    /// A tool's result.
    Tool {
        id: String,
        name: String,
        arguments: Value,
        output: Value,
    },
}

impl Turn {
    fn to_value(&self) -> Value {
        match self {
            Self::Model {
                message,
                model,
                finish_reason,
                usage,
            } => json!({"kind": "model", "message": message, "model": model,
                "finish_reason": finish_reason,
                "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}}),
            Self::Tool {
                id,
                name,
                arguments,
                output,
            } => {
                json!({"kind": "tool", "id": id, "name": name, "arguments": arguments, "output": output})
            }
        }
    }

    fn from_value(v: &Value) -> Option<Self> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        match v.get("kind")?.as_str()? {
            "model" => Some(Self::Model {
                message: v.get("message")?.clone(),
                model: text("model"),
                finish_reason: text("finish_reason"),
                usage: v
                    .get("usage")
                    .and_then(|u| Usage::deserialize(u).ok())
                    .unwrap_or_default()
                    .bounded(),
            }),
            "tool" => Some(Self::Tool {
                id: text("id")?,
                name: text("name")?,
                arguments: v.get("arguments").cloned().unwrap_or(Value::Null),
                output: v.get("output").cloned().unwrap_or(Value::Null),
            }),
            _ => None,
        }
    }
}

impl Turn {
    /// A tool's result: its message for the model, and its entry of the output's `tool_calls`.
    fn tell(&self, messages: &mut Vec<Value>, tool_calls: &mut Vec<Value>) {
        if let Self::Tool {
            id,
            name,
            arguments,
            output,
        } = self
        {
            messages
                .push(json!({"role": "tool", "tool_call_id": id, "content": tool_content(output)}));
            tool_calls.push(json!({"name": name, "arguments": arguments, "output": output}));
        }
    }
}

/// A tool output as the model reads it: JSON text.
fn tool_content(output: &Value) -> String {
    match output {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl LlmChat {
    /// The request body of one model call.
    fn body(&self, model: &str, messages: &[Value]) -> Value {
        let mut body = Map::new();
        body.insert("model".into(), json!(model));
        body.insert("messages".into(), Value::Array(messages.to_vec()));
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
        if let Some(t) = self.temperature {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(m) = self.max_tokens {
            body.insert("max_tokens".into(), json!(m));
        }
        if let Some((format, _)) = &self.response_format {
            body.insert("response_format".into(), format.clone());
        }
        if !self.tools.is_empty() {
            let tools: Vec<Value> = self
                .tools
                .iter()
                .map(|t| {
                    let mut function = Map::new();
                    function.insert("name".into(), json!(t.name));
                    if let Some(d) = &t.description {
                        function.insert("description".into(), json!(d));
                    }
                    function.insert("parameters".into(), t.parameters.clone());
                    json!({"type": "function", "function": function})
                })
                .collect();
            body.insert("tools".into(), Value::Array(tools));
        }
        Value::Object(body)
    }

    /// One model call, streamed: each piece of content is a `token` event.
    async fn call(
        &self,
        cx: &NodeContext,
        request: reqwest::RequestBuilder,
        turn: u32,
        token: Option<&str>,
    ) -> Result<Answer, NodeError> {
        let mut response = request.send().await.map_err(|e| {
            let (message, denied) = super::http::describe(&e);
            let retryable = !denied && (e.is_timeout() || e.is_connect() || e.is_request());
            NodeError::caused_by(
                format!("calling the model server failed: {message}"),
                retryable,
                e,
            )
        })?;
        let status = response.status();
        if !status.is_success() {
            let after = retry_after(response.headers());
            let mut body = Vec::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                body.extend_from_slice(&chunk);
                if body.len() >= MAX_ERROR_BODY {
                    break;
                }
            }
            let detail = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .or_else(|| v.get("error"))
                        .or_else(|| v.get("message"))
                        .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_owned))
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            // Redacted before it is cut: the run's scrubber sees only what is left, and a
            // token cut in two would pass it.
            let detail = match token {
                Some(token) if !token.is_empty() => detail.replace(token, "[redacted]"),
                _ => detail,
            };
            let message = format!(
                "the model server answered HTTP {status}: {}",
                clip(detail.trim(), 500)
            );
            return Err(match status.as_u16() {
                429 | 500..=599 => match after {
                    Some(after) if after > MAX_RETRY_AFTER => NodeError::fatal(format!(
                        "{message} (it asks to retry after {} s, longer than the {} s the node waits)",
                        after.as_secs(),
                        MAX_RETRY_AFTER.as_secs()
                    )),
                    Some(after) => NodeError::RetryAfter { message, after },
                    None => NodeError::retryable(message),
                },
                408 => NodeError::retryable(message),
                _ => NodeError::fatal(message),
            });
        }
        let limit = cx.engine().limits().max_output_bytes;
        let (run_id, node, attempt) = (
            cx.run_id().clone(),
            Arc::<str>::from(cx.node_id()),
            cx.attempt(),
        );
        let send = |delta: String| {
            cx.emit(&RunEvent::Token {
                run_id: run_id.clone(),
                node: node.clone(),
                delta,
                turn,
                attempt,
            });
        };
        // Each piece is an event, up to `EVENTS_A_CALL` of them; then pieces are gathered
        // into events of at least `GATHERED` bytes (a server sending one byte a chunk would
        // otherwise make millions of events).
        let (mut sent, mut gathered) = (0usize, String::new());
        let mut emit = |delta: &str| {
            if sent < EVENTS_A_CALL {
                sent += 1;
                send(delta.to_owned());
            } else {
                gathered.push_str(delta);
                if gathered.len() >= GATHERED {
                    send(std::mem::take(&mut gathered));
                }
            }
        };
        let mut stream = Stream::default();
        loop {
            let chunk = response.chunk().await.map_err(|e| {
                let (message, _) = super::http::describe(&e);
                NodeError::caused_by(
                    format!("the model server's stream was cut: {message}"),
                    true,
                    e,
                )
            })?;
            match chunk {
                Some(bytes) => stream.feed(&bytes, limit, &mut emit)?,
                None => break,
            }
            if stream.answer.done {
                break;
            }
        }
        stream.finish(limit, &mut emit)?;
        if !gathered.is_empty() {
            send(gathered);
        }
        let answer = stream.answer;
        if !answer.done && answer.finish_reason.is_none() {
            return Err(NodeError::retryable(
                "the model server's stream ended before the answer did (no finish_reason, no [DONE])",
            ));
        }
        Ok(answer)
    }
}

#[async_trait]
impl Node for LlmChat {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let scope = cx.scope();
        let render = |t: &Template, what: &str| {
            t.render_string(&scope)
                .map_err(|e| NodeError::fatal(format!("{what}: {e}")))
        };
        let base = render(&self.base_url, "base_url")?;
        let url = format!("{}/chat/completions", base.trim_end_matches('/'));
        let url = reqwest::Url::parse(&url)
            .map_err(|e| NodeError::fatal(format!("base_url `{base}`: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(NodeError::fatal(format!(
                "base_url `{base}`: only http and https are allowed"
            )));
        }
        let guard = cx.engine().http_guard();
        guard
            .check_url(&url)
            .map_err(|why| NodeError::fatal(format!("base_url `{base}`: {why}")))?;
        let model = render(&self.model, "model")?;
        let mut messages: Vec<Value> = Vec::with_capacity(self.messages.len() + 2);
        for (i, (role, content)) in self.messages.iter().enumerate() {
            let content = render(content, &format!("messages[{i}].content"))?;
            messages.push(json!({"role": role, "content": content}));
        }
        let token = match &self.credential {
            None => None,
            Some(name) => {
                let secret = cx.credential(name).await?;
                super::http::may_send(name, &secret, &url, self.literal_origin.as_ref())?;
                if secret.kind() != "bearer" {
                    return Err(NodeError::fatal(format!(
                        "credential `{name}` is of type `{}`; llm_chat sends a `bearer` one",
                        secret.kind()
                    )));
                }
                let token = secret.field("token").ok_or_else(|| {
                    NodeError::fatal(format!("credential `{name}` has no string field `token`"))
                })?;
                Some(token.to_owned())
            }
        };
        let client = cx
            .engine()
            .http_client()
            .map_err(|e| NodeError::fatal(format!("the HTTP client could not start: {e}")))?;

        // What earlier executions finished.
        let started_at = chrono::Utc::now();
        let stored = cx.checkpoints().await?;
        // The index of the next checkpoint: after every stored one (one not read as a turn
        // keeps its index: a new turn written there would be dropped as a repeat).
        let mut next_index = stored
            .iter()
            .map(|(i, _)| i.saturating_add(1))
            .max()
            .unwrap_or(0);
        let mut turns: Vec<Turn> = stored
            .iter()
            .filter_map(|(_, v)| Turn::from_value(v))
            .collect();
        let mut usage = Usage::default();
        let mut tool_calls: Vec<Value> = Vec::new();
        let mut last: Option<(Value, Option<String>, Option<String>)> = None;
        let mut model_calls = 0u32;
        for turn in &turns {
            match turn {
                Turn::Model {
                    message,
                    model: m,
                    finish_reason,
                    usage: u,
                } => {
                    model_calls += 1;
                    usage.add(*u);
                    messages.push(message.clone());
                    last = Some((message.clone(), m.clone(), finish_reason.clone()));
                }
                Turn::Tool { .. } => turn.tell(&mut messages, &mut tool_calls),
            }
        }

        loop {
            let calls: Vec<Value> = last
                .as_ref()
                .and_then(|(m, _, _)| m.get("tool_calls"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if calls.is_empty() && last.is_some() {
                break;
            }
            // The last allowed answer's tools would run for nothing: no call reads them.
            if model_calls >= self.max_iterations {
                return Err(NodeError::fatal(format!(
                    "the model still called tools after {} model calls (max_iterations)",
                    self.max_iterations
                )));
            }
            // The tool calls of the last answer that have no result yet run now: those past
            // the results stored after it (by position: a server may reuse ids).
            let done = turns
                .iter()
                .rev()
                .take_while(|t| matches!(t, Turn::Tool { .. }))
                .count();
            for call in calls.into_iter().skip(done) {
                let turn = self.run_tool(cx, &call).await?;
                turn.tell(&mut messages, &mut tool_calls);
                turns.push(turn.clone());
                self.keep(cx, started_at, model_calls, &mut next_index, &turn)
                    .await?;
            }
            // One more model call.
            let body = serde_json::to_vec(&self.body(&model, &messages))
                .map_err(|e| NodeError::fatal(format!("writing the request: {e}")))?;
            // Tool outputs pile up in the conversation: it may be the step output limit.
            let limit = cx.engine().limits().max_output_bytes;
            if body.len() > limit {
                return Err(NodeError::fatal(format!(
                    "the conversation grew past {limit} bytes (the step output limit) after {model_calls} model calls"
                )));
            }
            let mut request = client
                .post(url.clone())
                .timeout(self.timeout)
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
            if let Some(token) = &token {
                let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| {
                        NodeError::fatal("the credential's token is not a header value")
                    })?;
                value.set_sensitive(true);
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            let answer = self
                .call(cx, request, model_calls + 1, token.as_deref())
                .await?;
            model_calls += 1;
            let used = answer.usage.unwrap_or_default().bounded();
            usage.add(used);
            let answered_by = answer.model.clone().unwrap_or_else(|| model.clone());
            cx.emit_to_root(&RunEvent::LlmUsage {
                run_id: cx.run_id().clone(),
                node: Arc::from(cx.node_id()),
                model: answered_by.clone(),
                prompt_tokens: used.prompt_tokens,
                completion_tokens: used.completion_tokens,
            });
            // Before the checkpoint: a resumed run must not take a refusal for an answer.
            if !answer.refusal.is_empty() && answer.content.is_empty() {
                return Err(NodeError::fatal(format!(
                    "the model refused: {}",
                    clip(&answer.refusal, 500)
                )));
            }
            let mut message = Map::new();
            message.insert("role".into(), json!("assistant"));
            message.insert("content".into(), json!(answer.content));
            if !answer.calls.is_empty() {
                let calls: Vec<Value> = answer
                    .calls
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        // A server that names no id gets one, for the tool's answer.
                        let id = if c.id.is_empty() {
                            format!("call_{model_calls}_{i}")
                        } else {
                            c.id.clone()
                        };
                        json!({"id": id, "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}})
                    })
                    .collect();
                message.insert("tool_calls".into(), Value::Array(calls));
            }
            let message = Value::Object(message);
            let turn = Turn::Model {
                message: message.clone(),
                model: Some(answered_by.clone()),
                finish_reason: answer.finish_reason.clone(),
                usage: used,
            };
            messages.push(message.clone());
            turns.push(turn.clone());
            last = Some((message, Some(answered_by), answer.finish_reason));
            self.keep(cx, started_at, model_calls, &mut next_index, &turn)
                .await?;
        }

        let (message, answered_by, finish_reason) = last.expect("an answer ends the loop");
        let content = message
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let mut out = Map::new();
        if let Some((_, format)) = &self.response_format {
            let parsed = match format {
                Format::Text => None,
                Format::Json | Format::Schema(_) => Some(
                    serde_json::from_str::<Value>(content.trim())
                        .map_err(|e| NodeError::fatal(format!("the answer is not JSON: {e}")))?,
                ),
            };
            if let (Format::Schema(validator), Some(value)) = (format, &parsed)
                && let Some(why) = violations(validator, value)
            {
                return Err(NodeError::fatal(format!(
                    "the answer does not match response_format's schema: {why}"
                )));
            }
            if let Some(value) = parsed {
                out.insert("json".into(), value);
            }
        }
        out.insert("content".into(), Value::String(content));
        out.insert("model".into(), json!(answered_by));
        out.insert("finish_reason".into(), json!(finish_reason));
        out.insert(
            "usage".into(),
            json!({"prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens}),
        );
        out.insert("tool_calls".into(), Value::Array(tool_calls));
        Ok(Value::Object(out).into())
    }

    fn default_retry(&self) -> Option<RetryPolicy> {
        Some(RetryPolicy {
            max_attempts: 3,
            backoff_ms: 1_000,
            max_backoff_ms: 60_000,
        })
    }

    fn references(&self) -> References {
        let mut refs = self.base_url.references();
        refs.merge(self.model.references());
        self.messages
            .iter()
            .for_each(|(_, t)| refs.merge(t.references()));
        refs
    }
}

impl LlmChat {
    /// Checkpoints `turn` at `next_index` and moves the index on.
    async fn keep(
        &self,
        cx: &NodeContext,
        started_at: chrono::DateTime<chrono::Utc>,
        model_calls: u32,
        next_index: &mut u32,
        turn: &Turn,
    ) -> Result<(), NodeError> {
        let progress = ItemProgress {
            total: self.max_iterations,
            done: model_calls,
        };
        let item = vec![(*next_index, Arc::new(turn.to_value()))];
        cx.checkpoint(progress, started_at, item).await?;
        *next_index += 1;
        Ok(())
    }

    /// Runs the tool a call names, as a child run of this node with the call's arguments as
    /// its input. What goes wrong in the call (an unknown tool, arguments that are not JSON
    /// or break the schema, a tool flow that fails) is told to the model as the tool's
    /// output, `{"error": ...}`, so that it can correct itself within `max_iterations`.
    async fn run_tool(&self, cx: &NodeContext, call: &Value) -> Result<Turn, NodeError> {
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let name = call
            .pointer("/function/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let text = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let turn = |arguments: Value, output: Value| Turn::Tool {
            id: id.clone(),
            name: name.clone(),
            arguments,
            output,
        };
        let Some(tool) = self.tools.iter().find(|t| t.name == name) else {
            return Ok(turn(
                Value::Null,
                json!({"error": format!("there is no tool `{}`", clip(&name, 64))}),
            ));
        };
        let arguments: Value =
            match serde_json::from_str(if text.trim().is_empty() { "{}" } else { text }) {
                Ok(v) => v,
                Err(e) => {
                    return Ok(turn(
                        Value::String(text.to_owned()),
                        json!({"error": format!("the arguments are not JSON: {e}")}),
                    ));
                }
            };
        if let Some(why) = violations(&tool.validator, &arguments) {
            return Ok(turn(
                arguments,
                json!({"error": format!("the arguments do not match the tool's parameters: {why}")}),
            ));
        }
        let plan = super::subflow::load_stored(cx, &tool.flow_id, None).await?;
        cx.take_subflow_run()?;
        let result = cx
            .engine()
            .execute_child(&plan, arguments.clone(), cx)
            .await;
        Ok(match result.status {
            RunStatus::Succeeded => {
                let output = result.output.unwrap_or(Value::Null);
                let size = serde_json::to_vec(&output).map_or(usize::MAX, |b| b.len());
                if size > MAX_TOOL_OUTPUT {
                    turn(
                        arguments,
                        json!({"error": format!("tool `{name}` answered {size} bytes, more than the {MAX_TOOL_OUTPUT} sent to a model")}),
                    )
                } else {
                    turn(arguments, output)
                }
            }
            RunStatus::Cancelled => {
                return Err(NodeError::fatal(format!(
                    "tool `{name}` (flow `{}`) was cancelled",
                    tool.flow_id
                )));
            }
            status => turn(
                arguments,
                json!({"error": format!("tool `{name}` {status}: {}", result.error.unwrap_or_default())}),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &str, cut_at: usize) -> Result<(Answer, Vec<String>), NodeError> {
        let mut deltas = Vec::new();
        let mut stream = Stream::default();
        let bytes = body.as_bytes();
        for piece in bytes.chunks(cut_at.max(1)) {
            stream.feed(piece, 1 << 20, &mut |d: &str| deltas.push(d.to_owned()))?;
        }
        stream.finish(1 << 20, &mut |d: &str| deltas.push(d.to_owned()))?;
        Ok((stream.answer, deltas))
    }

    #[test]
    fn the_stream_reads_the_same_whatever_its_reads_split() {
        let body = concat!(
            ": keep-alive\r\n\r\n",
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m-1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\r\n\r\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hé\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"look\",\"arguments\":\"{\\\"i\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"d\\\": 1}\"}}]},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n",
            "data: [DONE]\n\n"
        );
        for cut in [1, 2, 3, 7, 64, body.len()] {
            let (answer, deltas) = read(body, cut).expect("reads");
            assert_eq!(deltas, vec!["Hé"], "cut {cut}");
            assert_eq!(answer.content, "Hé");
            assert_eq!(answer.model.as_deref(), Some("m-1"));
            assert_eq!(answer.finish_reason.as_deref(), Some("tool_calls"));
            assert_eq!(answer.calls.len(), 1);
            assert_eq!(answer.calls[0].id, "call_1");
            assert_eq!(answer.calls[0].name, "look");
            assert_eq!(answer.calls[0].arguments, "{\"id\": 1}");
            let usage = answer.usage.expect("usage");
            assert_eq!((usage.prompt_tokens, usage.completion_tokens), (7, 3));
            assert!(answer.done);
        }
    }

    #[test]
    fn a_malformed_event_a_long_line_and_a_large_answer_fail() {
        let err = read("data: {\"choices\": [\n\n", 5).expect_err("malformed");
        assert!(err.to_string().contains("malformed stream"), "{err}");
        let long = format!("data: {}", "x".repeat(MAX_LINE + 1));
        let err = read(&long, 4096).expect_err("too long");
        assert!(err.to_string().contains("longer than"), "{err}");
        let mut stream = Stream::default();
        let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"0123456789\"}}]}\n\n";
        stream
            .feed(chunk.as_bytes(), 15, &mut |_| {})
            .expect("10 bytes");
        let err = stream
            .feed(chunk.as_bytes(), 15, &mut |_| {})
            .expect_err("20 bytes");
        assert!(
            matches!(err, NodeError::OutputTooLarge { limit: 15 }),
            "{err}"
        );
    }

    #[test]
    fn an_event_of_endless_data_lines_fails_at_the_line_limit() {
        let mut stream = Stream::default();
        let line = format!("data: {}\n", "x".repeat(1000));
        let mut failed = None;
        for _ in 0..2_000 {
            if let Err(e) = stream.feed(line.as_bytes(), usize::MAX, &mut |_| {}) {
                failed = Some(e);
                break;
            }
        }
        let err = failed.expect("refused before 2 MB");
        assert!(err.to_string().contains("an event longer than"), "{err}");
        assert!(stream.data.len() <= MAX_LINE);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO), "a date past");
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn params_are_checked_when_the_flow_compiles() {
        let ok = json!({"base_url": "http://127.0.0.1:1/v1", "model": "m",
            "messages": [{"role": "user", "content": "{{ input.q }}"}]});
        assert!(build(&ok).is_ok());
        for (bad, says) in [
            (
                json!({"base_url": "ftp://x/v1", "model": "m", "messages": [{"role": "user", "content": "x"}]}),
                "only http",
            ),
            (
                json!({"base_url": "http://x/v1", "model": "m", "messages": []}),
                "at least one",
            ),
            (
                json!({"base_url": "http://x/v1", "model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "role",
            ),
            (
                json!({"base_url": "http://x/v1", "model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
                "temperature",
            ),
            (
                json!({"base_url": "http://x/v1", "model": "m", "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 7}}}}),
                "schema",
            ),
            (
                json!({"base_url": "http://x/v1", "model": "m", "messages": [{"role": "user", "content": "x"}],
                "tools": [{"name": "a b", "flow_id": "f"}]}),
                "tools[0].name",
            ),
            (
                json!({"base_url": "http://x/v1", "model": "m", "messages": [{"role": "user", "content": "x"}],
                "max_iterations": 0}),
                "max_iterations",
            ),
            (
                json!({"base_url": "http://x/v1", "model": "m", "messages": [{"role": "user", "content": "x"}],
                "stream": false}),
                "unknown field",
            ),
        ] {
            let Err(err) = build(&bad) else {
                panic!("{bad} was accepted")
            };
            let err = err.to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
