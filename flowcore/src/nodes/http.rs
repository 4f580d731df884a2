//! `http_request`: an HTTP call with reqwest (rustls on ring). Output `{status, headers, body}`;
//! the body is parsed as JSON when the response says it is JSON. A non-2xx status fails the node
//! unless `fail_on_status` is false; every failure but a 4xx other than 408 and 429 (5xx,
//! 408, 429, connection errors) is retryable.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::parse_params;
use crate::error::{NodeError, ParamError};
use crate::expr::{References, Template, ValueTemplate};
use crate::net::Guard;
use crate::node::{Node, NodeContext, Output};

const DEFAULT_TIMEOUT_MS: u64 = 30_000;
const MAX_TIMEOUT_MS: u64 = 600_000;

/// Redirects followed before the node fails.
const MAX_REDIRECTS: usize = 10;

/// An HTTP client that resolves names through `guard`, follows no redirects itself and uses no
/// environment proxy (a proxy would make the connection, and the guard would see its address).
pub(crate) fn client(guard: Arc<Guard>) -> Result<reqwest::Client, String> {
    // reqwest is built without a TLS provider of its own (to avoid aws-lc's slow C build);
    // ring is ours. Installing fails only if another is installed: fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("flowcore/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver(guard)))
        .build()
        .map_err(|e| e.to_string())
}

/// A refusal of the guard, told apart from other connection errors (it is not retryable).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Denied(String);

/// Resolves a name and refuses it when any of its addresses is denied: the connection then
/// goes to an address that was checked, so a name cannot re-resolve to another in between.
struct GuardedResolver(Arc<Guard>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !guard.exempt(&host) {
                for addr in &addrs {
                    // The refusal names the rule, not the address: a flow author must not map
                    // internal names to addresses through it.
                    guard.check_ip(addr.ip()).map_err(|_| {
                        Box::new(Denied(format!(
                            "`{host}` resolves to an address that FLOWCORE_HTTP_DENY denies; to \
                             reach it, add `{host}:<port>` or its range to FLOWCORE_HTTP_ALLOW"
                        )))
                    })?;
                }
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// The message of an error and of its sources, and whether the guard refused.
pub(crate) fn describe(e: &reqwest::Error) -> (String, bool) {
    let mut message = e.to_string();
    let mut denied = false;
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        denied |= cause.downcast_ref::<Denied>().is_some();
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    (message, denied)
}

/// The origin (scheme, host, port) of a URL template when no template decides it: the URL
/// parsed with each `{{ }}`, `{% %}` and `{# #}` replaced by a marker, refused when the marker
/// lands in the scheme, host or port (`https:///{{ h }}`, `https://{{ h }}.example.com`,
/// `https://api.example.com{{ h }}`, `https://x@{{ h }}` all let the template choose). A
/// credential without `allowed_hosts` goes only to this origin.
pub(crate) fn literal_origin(url: &str) -> Option<url::Origin> {
    const MARKER: &str = "flowcoretemplatemarker";
    let mut masked = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(start) = rest.find(['{']) {
        let close = match rest[start..].get(..2) {
            Some("{{") => "}}",
            Some("{%") => "%}",
            Some("{#") => "#}",
            _ => {
                masked.push_str(&rest[..=start]);
                rest = &rest[start + 1..];
                continue;
            }
        };
        masked.push_str(&rest[..start]);
        masked.push_str(MARKER);
        match rest[start + 2..].find(close) {
            Some(end) => rest = &rest[start + 2 + end + 2..],
            None => return None,
        }
    }
    masked.push_str(rest);
    let parsed = url::Url::parse(&masked).ok()?;
    let decided = |part: &str| part.to_ascii_lowercase().contains(MARKER);
    if decided(parsed.scheme()) || parsed.host_str().is_none_or(decided) {
        return None;
    }
    Some(parsed.origin())
}

struct HttpRequest {
    method: reqwest::Method,
    url: Template,
    headers: Vec<(String, Template)>,
    body: Option<ValueTemplate>,
    timeout: Duration,
    fail_on_status: bool,
    credential: Option<String>,
    /// Where a credential without `allowed_hosts` may go (see [`literal_origin`]).
    literal_origin: Option<url::Origin>,
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
    let body = super::value_template(p.body.as_ref(), "body")?;
    let timeout_ms = p.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(ParamError::new(format!(
            "timeout_ms must be between 1 and {MAX_TIMEOUT_MS}"
        )));
    }
    Ok(Box::new(HttpRequest {
        literal_origin: literal_origin(&p.url),
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

/// Whether credential `name` may go to `url`'s host: one of its `allowed_hosts`, or, when it
/// lists none, the host written literally in the flow (`literal_origin`).
pub(crate) fn may_send(
    name: &str,
    secret: &crate::secret::Secret,
    url: &reqwest::Url,
    literal_origin: Option<&url::Origin>,
) -> Result<(), NodeError> {
    match secret.allows(url) {
        Some(true) => Ok(()),
        Some(false) => Err(NodeError::fatal(format!(
            "credential `{name}` may not be sent to {} (not in its allowed_hosts; a host \
             without a port means https on 443)",
            url.origin().ascii_serialization()
        ))),
        None if literal_origin == Some(&url.origin()) => Ok(()),
        None => Err(NodeError::fatal(format!(
            "credential `{name}` has no allowed_hosts, so it is sent only to a host written \
             in the flow, and this URL's scheme, host or port comes from a template"
        ))),
    }
}

#[async_trait]
impl Node for HttpRequest {
    async fn run(&self, cx: &NodeContext) -> Result<Output, NodeError> {
        let scope = cx.scope();
        let url = self
            .url
            .render_string(&scope)
            .map_err(|e| NodeError::fatal(format!("url: {e}")))?;
        let first =
            reqwest::Url::parse(&url).map_err(|e| NodeError::fatal(format!("url `{url}`: {e}")))?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, template) in &self.headers {
            let value = template
                .render_string(&scope)
                .map_err(|e| NodeError::fatal(format!("headers.{name}: {e}")))?;
            let value = reqwest::header::HeaderValue::from_str(&value)
                .map_err(|_| NodeError::fatal(format!("headers.{name}: not a header value")))?;
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| NodeError::fatal(format!("headers.{name}: not a header name")))?;
            headers.append(name, value);
        }
        let credential = match &self.credential {
            None => None,
            Some(name) => {
                let secret = cx.credential(name).await?;
                may_send(name, &secret, &first, self.literal_origin.as_ref())?;
                Some((name, secret))
            }
        };
        let mut body = self
            .body
            .as_ref()
            .map(|body| body.render(&scope))
            .transpose()
            .map_err(|e| NodeError::fatal(format!("body: {e}")))?;
        let client = cx
            .engine()
            .http_client()
            .map_err(|e| NodeError::fatal(format!("the HTTP client could not start: {e}")))?;
        let guard = cx.engine().http_guard();
        let origin = first.origin();
        let mut url = first;
        let mut method = self.method.clone();
        let mut hops = 0;
        // Redirects are followed here, not by reqwest: each hop is checked by the guard, and
        // a credential never goes to another scheme, host or port.
        let mut response = loop {
            if !matches!(url.scheme(), "http" | "https") {
                return Err(NodeError::fatal(format!(
                    "url `{url}`: only http and https are allowed"
                )));
            }
            guard
                .check_url(&url)
                .map_err(|why| NodeError::fatal(format!("url `{url}`: {why}")))?;
            let mut request = client
                .request(method.clone(), url.clone())
                .timeout(self.timeout)
                .headers(headers.clone());
            if let Some((name, secret)) = &credential {
                request = authenticate(request, name, secret)?;
            }
            request = match &body {
                None => request,
                Some(Value::String(text)) => request.body(text.clone()),
                Some(json) => request.json(json),
            };
            let response = request.send().await.map_err(|e| {
                let (message, denied) = describe(&e);
                let retryable = !denied && (e.is_timeout() || e.is_connect() || e.is_request());
                NodeError::caused_by(format!("request failed: {message}"), retryable, e)
            })?;
            let Some(next) = response
                .status()
                .is_redirection()
                .then(|| response.headers().get(reqwest::header::LOCATION))
                .flatten()
                .and_then(|location| location.to_str().ok())
                .and_then(|location| url.join(location).ok())
            else {
                break response;
            };
            if next.origin() != origin {
                if let Some((name, _)) = &credential {
                    if self.fail_on_status {
                        return Err(NodeError::fatal(format!(
                            "HTTP {}: a redirect to another scheme, host or port ({}) is not \
                             followed with credential `{name}`",
                            response.status(),
                            next.origin().ascii_serialization()
                        )));
                    }
                    break response;
                }
                // As browsers do: what authenticated to one origin does not go to another.
                for sensitive in [
                    reqwest::header::AUTHORIZATION,
                    reqwest::header::COOKIE,
                    reqwest::header::PROXY_AUTHORIZATION,
                ] {
                    headers.remove(sensitive);
                }
            }
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(NodeError::fatal(format!(
                    "more than {MAX_REDIRECTS} redirects"
                )));
            }
            // 303, and 301/302 after a POST, become a GET without a body (RFC 9110 15.4).
            let status = response.status().as_u16();
            if status == 303 && method != reqwest::Method::HEAD
                || matches!(status, 301 | 302) && method == reqwest::Method::POST
            {
                method = reqwest::Method::GET;
                body = None;
            }
            url = next;
        };
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
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            NodeError::caused_by(format!("reading the response failed: {e}"), true, e)
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
            // Permanent: a 4xx other than 408 (the server timed out) and 429 (too many
            // requests), which a retry would only repeat. Anything else may pass.
            let permanent = status.is_client_error() && !matches!(status.as_u16(), 408 | 429);
            return Err(if permanent {
                NodeError::fatal(message)
            } else {
                NodeError::retryable(message)
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

#[cfg(test)]
mod tests {
    use super::literal_origin;

    #[test]
    fn only_a_url_whose_origin_no_template_decides_has_a_literal_origin() {
        for literal in [
            "https://api.example.com/v1/{{ input.path }}",
            "https://api.example.com:8443/x?q={{ input.q }}#{{ input.f }}",
            "http://127.0.0.1:9000/{% if input.a %}a{% endif %}",
        ] {
            assert!(literal_origin(literal).is_some(), "{literal}");
        }
        for templated in [
            "{{ input.url }}",
            "https:///{{ input.host }}/x",
            "https:\\\\{{ input.host }}/x",
            "https://{{ input.host }}.example.com/",
            "https://api.example.com{{ input.rest }}",
            "https://api.example.com:{{ input.port }}/",
            "https://user@{{ input.host }}/",
            "{{ input.scheme }}://api.example.com/",
            "https://api.example.com{# a comment #}/",
            "https://{{ unclosed",
        ] {
            assert!(literal_origin(templated).is_none(), "{templated}");
        }
    }
}
