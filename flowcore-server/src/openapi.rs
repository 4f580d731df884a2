//! The OpenAPI document of the API (utoipa), served at `/api/v1/openapi.json`. Every handler
//! carries its `#[utoipa::path]`; a test checks that the document and the router agree.

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ApiErrorBody, ApiErrorDetail};
use crate::lifecycle::{RunAnswer, RunState, SignalSent};
use crate::replay::{ReplayProgress, ReplayRequest};
use crate::routes::api_keys::{ApiKeyCreated, ApiKeyList, ApiKeyView, CreateApiKey};
use crate::routes::credentials::{CreateCredential, CredentialList, CredentialView};
use crate::routes::files::FileView;
use crate::routes::flows::{FlowChecked, FlowCreated, FlowSummary, FlowView};
use crate::routes::meta::{Health, Readiness};
use crate::routes::runs::{
    KeyedSignal, KeyedSignalSent, RerunRequest, RunSummary, RunView, StartRun, StepView, WaitView,
};
use crate::routes::usage::{Quota, UsageReport};

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
        crate::routes::meta::healthz, crate::routes::meta::readyz, crate::routes::meta::scrape, openapi_json,
        crate::routes::flows::create, crate::routes::flows::list, crate::routes::flows::read,
        crate::routes::flows::update, crate::routes::flows::delete,
        crate::routes::runs::start, crate::routes::runs::list, crate::routes::runs::read,
        crate::routes::runs::cancel, crate::routes::runs::rerun, crate::routes::runs::replay, crate::routes::runs::replay_progress, crate::routes::runs::signal, crate::routes::runs::keyed_signal,
        crate::routes::events::events,
        crate::routes::api_keys::create, crate::routes::api_keys::list, crate::routes::api_keys::revoke,
        crate::routes::credentials::create, crate::routes::credentials::list,
        crate::routes::credentials::read, crate::routes::credentials::remove,
        crate::routes::files::upload, crate::routes::files::download, crate::routes::files::meta,
        crate::routes::files::remove, crate::routes::usage::usage, crate::routes::webhooks::call,
    ),
    components(schemas(
        ApiErrorBody, ApiErrorDetail, Health, Readiness, FlowChecked, FlowCreated, FlowSummary, FlowView,
        StartRun, RunAnswer, RunState, StepView, RunView, RunSummary, WaitView, SignalSent,
        KeyedSignal, KeyedSignalSent, RerunRequest, ReplayRequest, ReplayProgress, CreateApiKey,
        ApiKeyCreated, ApiKeyView, ApiKeyList, CreateCredential, CredentialView, CredentialList,
        FileView, UsageReport, Quota,
    )),
    modifiers(&Security),
)]
#[allow(missing_debug_implementations)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", operation_id = "openapi", tag = "meta", responses((status = 200, description = "the OpenAPI 3.1 document", body = Object), (status = 401, description = "missing or wrong API key", body = ApiErrorBody)), security(("api_key" = [])))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
