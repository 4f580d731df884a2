//! The OpenAPI document of the API (utoipa), served at `/api/v1/openapi.json`. Every handler
//! carries its `#[utoipa::path]`; a test checks that the document and the router agree.

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// An error answer.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ApiErrorBody {
    error: ApiErrorDetail,
}

/// What went wrong.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ApiErrorDetail {
    /// A stable snake_case code (`invalid_json`, `not_found`, `unauthorized`, ...).
    code: String,
    /// For people.
    message: String,
    /// Structured details (for `invalid_flow`: `[{"node", "edge", "problem"}]`).
    #[schema(value_type = Option<Object>)]
    details: Option<serde_json::Value>,
}

/// A flow was stored.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct FlowCreated {
    id: String,
    version: u32,
}

/// How to start a run.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct StartRun {
    /// The run's input (default `{}`).
    #[schema(value_type = Option<Object>)]
    input: Option<serde_json::Value>,
    /// Wait up to WEBHOOK_TIMEOUT_SECONDS for the end (default true).
    wait: Option<bool>,
    /// The same key gives the same run.
    idempotency_key: Option<String>,
}

/// A started run.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct RunAnswer {
    run_id: String,
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled`, `timed_out`.
    status: String,
    /// When finished.
    #[schema(value_type = Option<Object>)]
    output: Option<serde_json::Value>,
    error: Option<String>,
}

/// A new API key.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct CreateApiKey {
    name: String,
    /// Of `read`, `run`, `write`, `admin`; default: the scopes of the key making it (a key
    /// grants only scopes it has).
    scopes: Option<Vec<String>>,
}

/// A credential to store.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct CreateCredential {
    /// Flows refer to it by this name.
    name: String,
    /// `bearer` (`token`), `basic_auth` (`username`, `password`) or `header` (`name`, `value`).
    #[schema(rename = "type")]
    kind: String,
    /// The secret fields.
    #[schema(value_type = Object)]
    data: serde_json::Value,
    /// The only hosts (`host` or `host:port`) it is sent to; without it, only hosts written
    /// literally in a flow's URL.
    allowed_hosts: Option<Vec<String>>,
}

/// A credential's metadata.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct CredentialView {
    id: String,
    name: String,
    #[schema(rename = "type")]
    kind: String,
    /// The key that encrypted it.
    key_id: String,
    created_at: String,
    updated_at: String,
}

/// A file's metadata.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct FileView {
    id: String,
    name: String,
    content_type: String,
    size: u64,
    created_at: String,
}

#[derive(Debug)]
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "x_api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(title = "flowcore", description = "The flowcore HTTP API. Every /api/ route takes `Authorization: Bearer <key>` or `x-api-key: <key>`."),
    paths(
        crate::app::healthz, crate::app::readyz, crate::metrics::scrape, openapi_json,
        crate::routes::flows::create, crate::routes::flows::list, crate::routes::flows::read,
        crate::routes::flows::update, crate::routes::flows::delete,
        crate::routes::runs::start, crate::routes::runs::list, crate::routes::runs::read,
        crate::routes::runs::cancel, crate::routes::events::events,
        crate::routes::api_keys::create, crate::routes::api_keys::list, crate::routes::api_keys::revoke,
        crate::routes::credentials::create, crate::routes::credentials::list,
        crate::routes::credentials::read, crate::routes::credentials::remove,
        crate::routes::files::upload, crate::routes::files::download, crate::routes::files::meta,
        crate::routes::files::remove, crate::routes::usage::usage, crate::routes::webhooks::call,
    ),
    components(schemas(ApiErrorBody, ApiErrorDetail, FlowCreated, StartRun, RunAnswer, CreateApiKey, CreateCredential, CredentialView, FileView)),
    modifiers(&Security),
)]
#[allow(missing_debug_implementations)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", operation_id = "openapi", tag = "meta", responses((status = 200, description = "the OpenAPI 3.1 document", body = Object), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
