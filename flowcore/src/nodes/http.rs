//! `http_request`: an HTTP call with reqwest (rustls on ring). Output `{status, headers, body}`;
//! the body is parsed as JSON when the response says it is JSON. A non-2xx status fails the node
//! unless `fail_on_status` is false; 5xx, 429 and connection errors are retryable.

use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::parse_params;
use crate::error::{NodeError, ParamError};
use crate::expr::{References, Template, ValueTemplate};
use crate::node::{Node, NodeContext, Output};

const DEFAULT_TIMEOUT_MS: u64 = 30_000;
const MAX_TIMEOUT_MS: u64 = 600_000;

static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();

fn client() -> Result<reqwest::Client, ParamError> {
    CLIENT
        .get_or_init(|| {
            // reqwest is built without a TLS provider of its own (to avoid aws-lc's slow C
            // build); ring is ours. Installing fails only if another is installed: fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .user_agent(concat!("flowcore/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| ParamError::new(format!("the HTTP client could not start: {e}")))
}

struct HttpRequest {
    client: reqwest::Client,
    method: reqwest::Method,
    url: Template,
    headers: Vec<(String, Template)>,
    body: Option<ValueTemplate>,
    timeout: Duration,
    fail_on_status: bool,
    credential: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpParams {
    #[serde(default = "default_method")]
    method: String,
    url: String,
    #[serde(default)]
    headers: Map<String, Value>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default = "yes")]
    fail_on_status: bool,
    /// The name of a stored credential (literal: a template would let a run's input pick which
    /// secret goes to which URL).
    #[serde(default)]
    credential: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}

fn yes() -> bool {
    true
}

pub(crate) fn build(params: &Value) -> Result<Box<dyn Node>, ParamError> {
    let p: HttpParams = parse_params(params)?;
    let method = match p.method.to_ascii_uppercase().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => {
            reqwest::Method::from_bytes(m.as_bytes())
                .map_err(|e| ParamError::new(format!("method: {e}")))?
        }
        other => {
            return Err(ParamError::new(format!(
                "method: `{other}` is not an HTTP method"
            )));
        }
    };
    let url = Template::compile(&p.url).map_err(|e| ParamError::new(format!("url: {e}")))?;
    if url.is_literal() {
        reqwest::Url::parse(&p.url).map_err(|e| ParamError::new(format!("url: {e}")))?;
    }
    let headers = p
        .headers
        .iter()
        .map(|(k, v)| {
            let text = v
                .as_str()
                .ok_or_else(|| ParamError::new(format!("headers.{k}: must be a string")))?;
            reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| ParamError::new(format!("headers.{k}: not a valid header name")))?;
            Ok((
                k.clone(),
                Template::compile(text)
                    .map_err(|e| ParamError::new(format!("headers.{k}: {e}")))?,
            ))
        })
        .collect::<Result<_, ParamError>>()?;
    let body = p
        .body
        .as_ref()
        .map(ValueTemplate::compile)
        .transpose()
        .map_err(|e| ParamError::new(format!("body: {e}")))?;
    let timeout_ms = p.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(ParamError::new(format!(
            "timeout_ms must be between 1 and {MAX_TIMEOUT_MS}"
        )));
    }
    Ok(Box::new(HttpRequest {
        client: client()?,
        method,
        url,
        headers,
        body,
        timeout: Duration::from_millis(timeout_ms),
        fail_on_status: p.fail_on_status,
        credential: p.credential,
    }))
}

/// Applies a credential to a request by its kind: `bearer` (`token`), `basic_auth` (`username`,
/// `password`) or `header` (`name`, `value`).
fn authenticate(
    request: reqwest::RequestBuilder,
    name: &str,
    secret: &crate::secret::Secret,
) -> Result<reqwest::RequestBuilder, NodeError> {
    let field = |f: &str| {
        secret.field(f).ok_or_else(|| {
            NodeError::fatal(format!("credential `{name}` has no string field `{f}`"))
        })
    };
    Ok(match secret.kind() {
        "bearer" => request.bearer_auth(field("token")?),
        "basic_auth" => request.basic_auth(field("username")?, Some(field("password")?)),
        "header" => {
            let header = reqwest::header::HeaderName::from_bytes(field("name")?.as_bytes())
                .map_err(|_| {
                    NodeError::fatal(format!("credential `{name}`: `name` is not a header name"))
                })?;
            let mut value =
                reqwest::header::HeaderValue::from_str(field("value")?).map_err(|_| {
                    NodeError::fatal(format!(
                        "credential `{name}`: `value` is not a header value"
                    ))
                })?;
            value.set_sensitive(true);
            request.header(header, value)
        }
        other => {
            return Err(NodeError::fatal(format!(
                "credential `{name}` is of type `{other}`, which http_request cannot use"
            )));
        }
    })
}

#[async_trait]
impl Node for HttpRequest {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let scope = cx.scope();
        let url = self
            .url
            .render_string(&scope)
            .map_err(|e| NodeError::fatal(format!("url: {e}")))?;
        let url =
            reqwest::Url::parse(&url).map_err(|e| NodeError::fatal(format!("url `{url}`: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(NodeError::fatal(format!(
                "url `{url}`: only http and https are allowed"
            )));
        }
        let mut request = self
            .client
            .request(self.method.clone(), url)
            .timeout(self.timeout);
        for (name, template) in &self.headers {
            let value = template
                .render_string(&scope)
                .map_err(|e| NodeError::fatal(format!("headers.{name}: {e}")))?;
            request = request.header(name.as_str(), value);
        }
        if let Some(name) = &self.credential {
            request = authenticate(request, name, &cx.credential(name).await?)?;
        }
        if let Some(body) = &self.body {
            request = match body
                .render(&scope)
                .map_err(|e| NodeError::fatal(format!("body: {e}")))?
            {
                Value::String(text) => request.body(text),
                json => request.json(&json),
            };
        }
        let mut response = request.send().await.map_err(|e| NodeError::Other {
            message: format!("request failed: {e}"),
            retryable: e.is_timeout() || e.is_connect() || e.is_request(),
            source: Box::new(e),
        })?;
        let status = response.status();
        let mut headers = Map::new();
        for (name, value) in response.headers() {
            headers.insert(
                name.as_str().to_owned(),
                Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
            );
        }
        let is_json = headers
            .get("content-type")
            .and_then(Value::as_str)
            .is_some_and(|ct| ct.contains("json"));
        // Read the body chunk by chunk so that a huge answer fails at the limit instead of
        // filling memory first.
        let limit = cx.engine().limits().max_output_bytes;
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| NodeError::Other {
            message: format!("reading the response failed: {e}"),
            retryable: true,
            source: Box::new(e),
        })? {
            if bytes.len() + chunk.len() > limit {
                return Err(NodeError::OutputTooLarge { limit });
            }
            bytes.extend_from_slice(&chunk);
        }
        let body = if is_json {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        } else {
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        };
        if self.fail_on_status && !status.is_success() {
            let message = format!("HTTP {status}");
            return Err(if status.is_server_error() || status.as_u16() == 429 {
                NodeError::retryable(message)
            } else {
                NodeError::fatal(message)
            });
        }
        Ok(
            serde_json::json!({ "status": status.as_u16(), "headers": headers, "body": body })
                .into(),
        )
    }

    fn references(&self) -> References {
        let mut refs = self.url.references();
        self.headers
            .iter()
            .for_each(|(_, t)| refs.merge(t.references()));
        if let Some(body) = &self.body {
            refs.merge(body.references());
        }
        refs
    }
}
