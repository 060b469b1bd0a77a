//! The REST API (axum). Handlers only parse requests into [`Action`]s or calls on
//! [`VmService`] and turn results into responses; the one place an error becomes a status is
//! [`ApiError::into_response`], through the table in `hearth_api::ErrorCode`.
//! Only this module knows HTTP.

mod access;
mod auth;
mod backup;
mod docs;
mod export;
pub mod guard;
mod network;
mod secret;
mod stream;
mod volume;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use hearth_api::{
    CreateVmRequest, ErrorBody, ErrorCode, ExecRequest, ExecResponse, ExecStreamEvent, Health, Vm,
    VmDetail, WsClientMessage, WsServerMessage,
};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::vm::{Action, Caller, Reply, VmError, VmService};

#[derive(Debug, Clone)]
pub struct AppState {
    pub service: VmService,
    pub request_timeout: Duration,
    pub guard: Arc<guard::Guard>,
}

/// An error on its way to becoming a response.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> ApiError {
        let code = e.code();
        let message = e.message();
        if code.http_status() >= 500 {
            tracing::warn!(code = %code, %message, "request failed");
        }
        ApiError { code, message }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: self.code,
            message: self.message,
        };
        (status, axum::Json(body)).into_response()
    }
}

/// `Json` that reports a bad body as `invalid_request` with serde's explanation.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            ErrorCode::RequestTooLarge,
            "the request body is larger than server.max_json_body_bytes allows",
        );
    }
    let detail = r.body_text();
    let detail = detail
        .strip_prefix("Failed to deserialize the JSON body into the target type: ")
        .unwrap_or(&detail);
    ApiError::new(
        ErrorCode::InvalidRequest,
        format!("invalid request body: {detail}"),
    )
}

fn query_rejection(r: QueryRejection) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidRequest,
        format!("invalid query parameters: {}", r.body_text()),
    )
}

/// Runs an action with the request timeout.
async fn run(state: &AppState, caller: &Caller, action: Action) -> Result<Reply, ApiError> {
    match tokio::time::timeout(state.request_timeout, state.service.handle(caller, action)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ApiError::new(
            ErrorCode::OperationTimeout,
            format!(
                "the request took longer than server.request_timeout_secs ({} s); the operation goes on, and the VM's state and events show when it is done",
                state.request_timeout.as_secs()
            ),
        )),
    }
}

pub(crate) fn unexpected(reply: Reply) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("unexpected reply {reply:?}"))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hearth API",
        description = "Self-hosted microVMs: create, run commands in, and manage isolated Linux VMs.",
        license(name = "Apache-2.0")
    ),
    paths(
        health,
        metrics,
        stats,
        list_vms,
        create_vm,
        get_vm,
        delete_vm,
        start_vm,
        stop_vm,
        restart_vm,
        pause_vm,
        resume_vm,
        resize_vm,
        backup::create_backup,
        backup::list_backups,
        backup::delete_backup,
        backup::restore,
        export::export,
        export::import,
        vm_logs,
        exec,
        exec_stream,
        exec_ws,
        put_file,
        get_file,
        network::set_egress,
        network::list_networks,
        network::create_network,
        network::delete_network,
        network::connect,
        network::disconnect,
        volume::create_volume,
        volume::list_volumes,
        volume::delete_volume,
        volume::attach_volume,
        volume::detach_volume,
        access::whoami,
        access::switch_org,
        access::list_users,
        access::create_user,
        access::delete_user,
        access::list_ssh_keys,
        access::add_ssh_key,
        access::remove_ssh_key,
        access::list_api_keys,
        access::create_api_key,
        access::revoke_api_key,
        access::list_orgs,
        access::create_org,
        access::add_member,
        access::remove_member,
        access::audit,
        secret::set_secret,
        secret::list_secrets,
        secret::delete_secret,
        secret::rotate_master_key
    ),
    modifiers(&Authenticated),
    components(schemas(
        ErrorBody,
        ErrorCode,
        Health,
        hearth_api::VmStats,
        Vm,
        VmDetail,
        hearth_api::VmNetwork,
        hearth_api::EgressPolicy,
        hearth_api::EgressRequest,
        hearth_api::Network,
        hearth_api::CreateNetworkRequest,
        hearth_api::NetworkHealth,
        CreateVmRequest,
        hearth_api::ResizeVmRequest,
        hearth_api::Backup,
        hearth_api::RestoreRequest,
        hearth_api::Volume,
        hearth_api::VmVolume,
        hearth_api::CreateVolumeRequest,
        hearth_api::AttachVolumeRequest,
        hearth_api::VolumeAttachment,
        ExecRequest,
        ExecResponse,
        ExecStreamEvent,
        WsClientMessage,
        WsServerMessage,
        hearth_api::Role,
        hearth_api::Whoami,
        hearth_api::OrgMembership,
        hearth_api::User,
        hearth_api::CreateUserRequest,
        hearth_api::SshKey,
        hearth_api::AddSshKeyRequest,
        hearth_api::ApiKey,
        hearth_api::CreatedApiKey,
        hearth_api::CreateApiKeyRequest,
        hearth_api::Org,
        hearth_api::OrgMember,
        hearth_api::CreateOrgRequest,
        hearth_api::AddMemberRequest,
        hearth_api::SwitchOrgRequest,
        hearth_api::AuditEntry,
        hearth_api::SetSecretRequest,
        hearth_api::SecretInfo,
        hearth_api::RotatedMasterKey
    ))
)]
pub struct ApiDoc;

/// What authentication adds to every operation: the bearer scheme, and the 401 and 429 any
/// request can meet (see `auth`).
struct Authenticated;

impl utoipa::Modify for Authenticated {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`hearth key create`). Without one, callers on loopback or the unix socket are the host's operator when auth.localhost_admin is on.",
                    ))
                    .build(),
            ),
        );
        doc.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                op.responses.responses.insert(
                    "401".into(),
                    error("No valid API key, and the caller is not local with auth.localhost_admin on (unauthenticated)").into(),
                );
                op.responses.responses.insert(
                    "429".into(),
                    error(
                        "Too many failed logins from this address (rate_limited); try again later",
                    )
                    .into(),
                );
            }
        }
    }
}

/// The OpenAPI document, as served at `/openapi.json` and committed at the repository root.
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.to_pretty_json().unwrap_or_default() + "\n"
}

pub fn router(state: AppState) -> Router {
    let guard = state.guard.clone();
    let v1 = Router::new()
        .route("/health", get(health))
        .route("/whoami", get(access::whoami))
        .route("/whoami/org", put(access::switch_org))
        .route("/users", get(access::list_users).post(access::create_user))
        .route("/users/{user}", delete(access::delete_user))
        .route(
            "/users/{user}/ssh-keys",
            get(access::list_ssh_keys).post(access::add_ssh_key),
        )
        .route(
            "/users/{user}/ssh-keys/{fingerprint}",
            delete(access::remove_ssh_key),
        )
        .route(
            "/api-keys",
            get(access::list_api_keys).post(access::create_api_key),
        )
        .route("/api-keys/{id}", delete(access::revoke_api_key))
        .route("/orgs", get(access::list_orgs).post(access::create_org))
        .route("/orgs/{org}/members", post(access::add_member))
        .route("/orgs/{org}/members/{user}", delete(access::remove_member))
        .route("/audit", get(access::audit))
        .route("/secrets", get(secret::list_secrets))
        .route(
            "/secrets/rotate-master-key",
            post(secret::rotate_master_key),
        )
        .route(
            "/secrets/{secret}",
            put(secret::set_secret).delete(secret::delete_secret),
        )
        .route("/stats", get(stats))
        .route("/vms", get(list_vms).post(create_vm))
        .route("/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/vms/{name}/start", post(start_vm))
        .route("/vms/{name}/stop", post(stop_vm))
        .route("/vms/{name}/restart", post(restart_vm))
        .route("/vms/{name}/pause", post(pause_vm))
        .route("/vms/{name}/resume", post(resume_vm))
        .route("/vms/{name}/resize", post(resize_vm))
        .route(
            "/vms/{name}/backups",
            post(backup::create_backup).get(backup::list_backups),
        )
        .route(
            "/vms/{name}/backups/{backup}",
            axum::routing::delete(backup::delete_backup),
        )
        .route("/vms/{name}/restore", post(backup::restore))
        .route("/vms/{name}/export", get(export::export))
        .route("/imports", post(export::import))
        .route("/vms/{name}/logs", get(vm_logs))
        .route("/vms/{name}/exec", post(exec))
        .route("/vms/{name}/exec/stream", post(exec_stream))
        .route("/vms/{name}/exec/ws", get(exec_ws))
        .route("/vms/{name}/files", get(get_file).put(put_file))
        .route("/vms/{name}/egress", put(network::set_egress))
        .route(
            "/networks",
            get(network::list_networks).post(network::create_network),
        )
        .route("/networks/{network}", delete(network::delete_network))
        .route(
            "/networks/{network}/members/{name}",
            put(network::connect).delete(network::disconnect),
        )
        .route(
            "/volumes",
            get(volume::list_volumes).post(volume::create_volume),
        )
        .route("/volumes/{volume}", delete(volume::delete_volume))
        .route(
            "/vms/{name}/volumes/{volume}",
            put(volume::attach_volume).delete(volume::detach_volume),
        );
    Router::new()
        .nest(hearth_api::API_PREFIX, v1)
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/docs", get(docs::page))
        .route(
            "/",
            get(|| async { axum::response::Redirect::temporary("/docs") }),
        )
        .fallback(|| async {
            ApiError::new(
                ErrorCode::NotFound,
                "no such endpoint; the API is described at /docs and /openapi.json",
            )
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                format!("{method} is not allowed here; the API is described at /docs"),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .with_state(state)
        .layer(axum::extract::DefaultBodyLimit::max(
            guard.max_json_body_bytes(),
        ))
        .layer(axum::middleware::from_fn_with_state(guard, guard::check))
}

/// Prometheus metrics: every action's duration and failures, admission refusals, VMs per state,
/// the host's capacity and commitment, and each running VM's VMM CPU time and memory.
/// OpenMetrics text when the `Accept` header asks for it (as Prometheus does), else the classic
/// text format.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, content((String = "application/openmetrics-text"), (String = "text/plain"))),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout)", body = ErrorBody)))]
async fn metrics(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let text = match run(&state, &caller, Action::Metrics { openmetrics }).await? {
        Reply::Metrics(text) => text,
        other => return Err(unexpected(other)),
    };
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

/// Every VM's state and shape, and what its VMM process uses now: CPU time, resident memory,
/// age (what `hearth top` samples; CPU use is the difference of two samples).
#[utoipa::path(get, path = "/v1/stats", tag = "system",
    responses((status = 200, body = [hearth_api::VmStats]),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout)", body = ErrorBody)))]
async fn stats(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<hearth_api::VmStats>>, ApiError> {
    match run(&state, &caller, Action::Stats).await? {
        Reply::Stats(s) => Ok(axum::Json(s)),
        other => Err(unexpected(other)),
    }
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}

/// Service health and configuration summary.
#[utoipa::path(get, path = "/v1/health", tag = "system",
    responses((status = 200, body = Health),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
async fn health(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Health>, ApiError> {
    match run(&state, &caller, Action::Health).await? {
        Reply::Health(h) => Ok(axum::Json(h)),
        other => Err(unexpected(other)),
    }
}

/// List VMs.
#[utoipa::path(get, path = "/v1/vms", tag = "vms",
    responses((status = 200, body = [Vm]),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
async fn list_vms(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<Vm>>, ApiError> {
    match run(&state, &caller, Action::ListVms).await? {
        Reply::Vms(v) => Ok(axum::Json(v)),
        other => Err(unexpected(other)),
    }
}

/// Create a VM (and start it unless `start` is false). Returns once it runs.
#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateVmRequest,
    responses(
        (status = 201, body = VmDetail),
        (status = 400, description = "A field breaks a rule (invalid_name, invalid_cpus, invalid_ram, invalid_rootfs_size; invalid_path of a volume; invalid_request naming networks, egress, user_data, ssh_authorized_keys or volumes), or the body is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "A network in `networks` (network_not_found) or a volume in `volumes` (volume_not_found) does not exist; nothing is made", body = ErrorBody),
        (status = 409, description = "The name is taken (vm_name_taken), a volume in `volumes` is attached to another VM, which the message names (volume_in_use; nothing is made), the host has not the vCPUs, memory, RAM-file space or addresses left (insufficient_capacity), or another operation on the name is in progress (vm_busy)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "The VM could not start, its network slot included (vmm_failed; nothing is left behind), or internal; the server log has details", body = ErrorBody),
        (status = 503, description = "The guest image is not built yet or failed to build (image_unavailable), or hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody),
        (status = 507, description = "The new disk does not fit the data directory's filesystem, or it filled up while a volume was formatted (resource_exhausted)", body = ErrorBody),
    ))]
async fn create_vm(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateVmRequest>,
) -> Result<(StatusCode, axum::Json<VmDetail>), ApiError> {
    match run(&state, &caller, Action::CreateVm(req)).await? {
        Reply::Created(d) => Ok((StatusCode::CREATED, axum::Json(d))),
        other => Err(unexpected(other)),
    }
}

/// Inspect a VM, with its event history.
#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = VmDetail),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
async fn get_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<VmDetail>, ApiError> {
    match run(&state, &caller, Action::GetVm(name)).await? {
        Reply::VmDetail(d) => Ok(axum::Json(d)),
        other => Err(unexpected(other)),
    }
}

/// Delete a VM and everything it has (stops it first when running).
#[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 204, description = "Deleted"),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "Its state does not allow it now (invalid_state) or another operation on it is in progress (vm_busy)", body = ErrorBody),
        (status = 500, description = "The VMM could not be stopped (vmm_failed), or internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
async fn delete_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    match run(&state, &caller, Action::DeleteVm(name)).await? {
        Reply::Deleted => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected(other)),
    }
}

/// Start a stopped VM; returns once its guest agent answers.
#[utoipa::path(post, path = "/v1/vms/{name}/start", tag = "vms",
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Vm),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "Not stopped (invalid_state), another operation on it is in progress (vm_busy), or the host has not the vCPUs, memory or RAM-file space left (insufficient_capacity)", body = ErrorBody),
        (status = 500, description = "Boot failed, its network slot included (vmm_failed; see last_error), or internal; the server log has details", body = ErrorBody),
        (status = 503, description = "The guest image is not ready (image_unavailable), or hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody),
        (status = 507, description = "The host ran out of something the VM needs (resource_exhausted)", body = ErrorBody)))]
async fn start_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<Vm>, ApiError> {
    match run(&state, &caller, Action::StartVm(name)).await? {
        Reply::Vm(v) => Ok(axum::Json(v)),
        other => Err(unexpected(other)),
    }
}

/// Change a stopped VM's cpus, memory or root disk size (the disk only grows); the new shape
/// holds from its next start.
#[utoipa::path(post, path = "/v1/vms/{name}/resize", tag = "vms", request_body = hearth_api::ResizeVmRequest,
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = VmDetail),
        (status = 400, description = "A field breaks a rule (invalid_cpus, invalid_ram, invalid_rootfs_size: also a smaller root disk), no field is given (invalid_request), or the body is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "Not stopped (invalid_state), or another operation on it is in progress (vm_busy)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "The disk could not be grown (internal; the disk is as it was), or internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody),
        (status = 507, description = "The host has not the disk space the growth needs (resource_exhausted; nothing changed)", body = ErrorBody)))]
async fn resize_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(request): Json<hearth_api::ResizeVmRequest>,
) -> Result<axum::Json<VmDetail>, ApiError> {
    match run(&state, &caller, Action::ResizeVm { name, request }).await? {
        Reply::VmDetail(d) => Ok(axum::Json(d)),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct StopParams {
    /// Seconds to wait for a graceful power-off before forcing it (default: guest.stop_timeout_secs).
    timeout_secs: Option<u64>,
}

/// Stop a running or paused VM (a paused one is resumed first): the guest powers off cleanly,
/// or is ended after the timeout.
#[utoipa::path(post, path = "/v1/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "VM name or id"), StopParams),
    responses((status = 200, body = Vm),
        (status = 400, description = "A query parameter is malformed or unknown (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "Neither running nor paused (invalid_state) or another operation on it is in progress (vm_busy)", body = ErrorBody),
        (status = 500, description = "The VMM could not be stopped (vmm_failed), or internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
async fn stop_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    params: Result<Query<StopParams>, QueryRejection>,
) -> Result<axum::Json<Vm>, ApiError> {
    let Query(params) = params.map_err(query_rejection)?;
    let timeout = params.timeout_secs.map(Duration::from_secs);
    match run(&state, &caller, Action::StopVm { name, timeout }).await? {
        Reply::Vm(v) => Ok(axum::Json(v)),
        other => Err(unexpected(other)),
    }
}

/// Restart a VM (stop if running or paused, then start).
#[utoipa::path(post, path = "/v1/vms/{name}/restart", tag = "vms",
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Vm),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "Its state does not allow it (invalid_state), another operation on it is in progress (vm_busy), or the host has not the capacity left (insufficient_capacity)", body = ErrorBody),
        (status = 500, description = "Boot failed, its network slot included (vmm_failed; see last_error), or internal; the server log has details", body = ErrorBody),
        (status = 503, description = "The guest image is not ready (image_unavailable), or hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody),
        (status = 507, description = "The host ran out of something the VM needs (resource_exhausted)", body = ErrorBody)))]
async fn restart_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<Vm>, ApiError> {
    match run(&state, &caller, Action::RestartVm(name)).await? {
        Reply::Vm(v) => Ok(axum::Json(v)),
        other => Err(unexpected(other)),
    }
}

/// Pause a running VM: its vCPUs stop, and it keeps its RAM, vCPUs, disk and network. Exec and
/// file transfers are refused until it is resumed; its logs can be read.
#[utoipa::path(post, path = "/v1/vms/{name}/pause", tag = "vms",
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Vm),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "Not running (invalid_state: also when it is paused already), or another operation on it is in progress (vm_busy)", body = ErrorBody),
        (status = 500, description = "The VMM did not pause the guest, or its VMM has exited (vmm_failed; the VM runs on), or internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
async fn pause_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<Vm>, ApiError> {
    match run(&state, &caller, Action::PauseVm(name)).await? {
        Reply::Vm(v) => Ok(axum::Json(v)),
        other => Err(unexpected(other)),
    }
}

/// Resume a paused VM: its vCPUs run again where they stopped.
#[utoipa::path(post, path = "/v1/vms/{name}/resume", tag = "vms",
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Vm),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "Not paused (invalid_state), or another operation on it is in progress (vm_busy)", body = ErrorBody),
        (status = 500, description = "The VMM did not resume the guest, or its VMM has exited (vmm_failed; the VM stays paused), or internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
async fn resume_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<Vm>, ApiError> {
    match run(&state, &caller, Action::ResumeVm(name)).await? {
        Reply::Vm(v) => Ok(axum::Json(v)),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LogParams {
    /// Which log (described in [`log_source_schema`]: a schema given so loses the doc comment).
    #[param(schema_with = log_source_schema)]
    source: Option<String>,
    /// Keep the response open and send new output as it is written.
    follow: Option<bool>,
    /// Only the last N lines.
    tail: Option<usize>,
}

/// The values `vm_logs` takes for `source`, for the document.
fn log_source_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .description(Some(
            "`serial` (the guest console, default) or `vmm` (the VMM's own output; `qemu` and `firecracker` are taken for it too).",
        ))
        .enum_values(Some(["serial", "vmm", "qemu", "firecracker"]))
        .build()
}

/// A VM's serial console or VMM log, as text; `follow=true` streams.
#[utoipa::path(get, path = "/v1/vms/{name}/logs", tag = "vms",
    params(("name" = String, Path, description = "VM name or id"), LogParams),
    responses((status = 200, content_type = "text/plain", body = String),
        (status = 400, description = "A query parameter is malformed or unknown, or source is not serial or vmm (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 500, description = "The log cannot be read, or internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many streams open as it takes, or hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
async fn vm_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    params: Result<Query<LogParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(query_rejection)?;
    let source = match p.source.as_deref() {
        None | Some("serial") => crate::vm::LogSource::Serial,
        Some("vmm" | "qemu" | "firecracker") => crate::vm::LogSource::Vmm,
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("invalid source {other:?}: must be serial or vmm"),
            ));
        }
    };
    let window = crate::vm::LogWindow {
        tail: p.tail,
        follow: p.follow.unwrap_or(false),
    };
    stream::logs(&state.service, &caller, name, source, window).await
}

/// Run a command and wait for it: exit code and collected output (up to 16 MiB per stream).
#[utoipa::path(post, path = "/v1/vms/{name}/exec", tag = "exec", request_body = ExecRequest,
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = ExecResponse),
        (status = 400, description = "The body is malformed (invalid_request), the command is empty or malformed (invalid_command), its program does not exist in the guest (command_not_found), or cwd is not absolute (invalid_path)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "The VM is not running (invalid_state; also while it is paused)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 502, description = "The guest agent refused or failed the request (guest_error)", body = ErrorBody),
        (status = 503, description = "The guest agent is not reachable (guest_unavailable), or hearthd has as many requests in hand as it takes (overloaded)", body = ErrorBody),
        (status = 504, description = "The guest did not answer in time (guest_timeout), or the request took longer than server.request_timeout_secs (operation_timeout)", body = ErrorBody)))]
async fn exec(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(request): Json<ExecRequest>,
) -> Result<axum::Json<ExecResponse>, ApiError> {
    match run(&state, &caller, Action::Exec { name, request }).await? {
        Reply::Exec(r) => Ok(axum::Json(r)),
        other => Err(unexpected(other)),
    }
}

/// Run a command and stream its output as newline-delimited JSON (`ExecStreamEvent` per line).
#[utoipa::path(post, path = "/v1/vms/{name}/exec/stream", tag = "exec", request_body = ExecRequest,
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, description = "One ExecStreamEvent per line; errors after the stream began are its last line", content_type = "application/x-ndjson", body = ExecStreamEvent),
        (status = 400, description = "The body is malformed (invalid_request), the command is empty or malformed (invalid_command), its program does not exist in the guest (command_not_found), or cwd is not absolute (invalid_path)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "The VM is not running (invalid_state; also while it is paused)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 502, description = "The guest agent refused or failed the request (guest_error)", body = ErrorBody),
        (status = 503, description = "The guest agent is not reachable (guest_unavailable), or hearthd has as many requests in hand as it takes (overloaded)", body = ErrorBody),
        (status = 504, description = "The guest did not answer in time (guest_timeout)", body = ErrorBody)))]
async fn exec_stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(request): Json<ExecRequest>,
) -> Result<Response, ApiError> {
    stream::exec_ndjson(&state.service, &caller, name, request).await
}

/// Interactive exec over a WebSocket: stdin, a PTY, resize and signals (`WsClientMessage`
/// in, output and `WsServerMessage` out).
#[utoipa::path(get, path = "/v1/vms/{name}/exec/ws", tag = "exec",
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "The request is not a WebSocket upgrade (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "The VM is not running (invalid_state; also while it is paused)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "The guest agent is not reachable (guest_unavailable), or hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
async fn exec_ws(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ws: Result<
        axum::extract::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|r| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("this endpoint speaks WebSocket only: {}", r.body_text()),
        )
    })?;
    stream::exec_ws(&state.service, caller, name, ws).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct FileParams {
    /// Absolute path in the guest.
    path: String,
    /// Permission bits in octal, e.g. `644` (default 644), for uploads.
    mode: Option<String>,
}

/// Upload a file into the guest (the body is the file's bytes). Parent directories are created.
#[utoipa::path(put, path = "/v1/vms/{name}/files", tag = "files",
    params(("name" = String, Path, description = "VM name or id"), FileParams),
    request_body(content_type = "application/octet-stream", content = Vec<u8>),
    responses((status = 204, description = "Written"),
        (status = 400, description = "path is missing or the query is malformed, mode is not octal permission bits (invalid_request), or the path is not absolute or not valid in the guest (invalid_path)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found), or the guest has no such file (guest_file_not_found)", body = ErrorBody),
        (status = 409, description = "The VM is not running (invalid_state; also while it is paused)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 502, description = "The guest agent refused or failed the transfer (guest_error)", body = ErrorBody),
        (status = 503, description = "The guest agent is not reachable (guest_unavailable), or hearthd has as many streams open as it takes (overloaded)", body = ErrorBody),
        (status = 504, description = "The guest did not answer in time (guest_timeout)", body = ErrorBody)))]
async fn put_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    params: Result<Query<FileParams>, QueryRejection>,
    body: axum::body::Body,
) -> Result<StatusCode, ApiError> {
    let Query(p) = params.map_err(query_rejection)?;
    let mode = match &p.mode {
        None => 0o644,
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("invalid mode {m:?}: must be octal permission bits such as 644"),
                )
            })?,
    };
    stream::put_file(&state.service, &caller, name, p.path, mode, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Download a file from the guest. The `x-hearth-file-mode` header carries its permission bits,
/// `x-hearth-file-size` the size the guest reported (the body is sent chunked: files under `/proc`
/// or ones that change while read have another length).
#[utoipa::path(get, path = "/v1/vms/{name}/files", tag = "files",
    params(("name" = String, Path, description = "VM name or id"), FileParams),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "path is missing or the query is malformed (invalid_request), or the path is not absolute or not valid in the guest (invalid_path)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No such VM or file (vm_not_found, guest_file_not_found)", body = ErrorBody),
        (status = 409, description = "The VM is not running (invalid_state; also while it is paused)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 502, description = "The guest agent refused or failed the transfer (guest_error)", body = ErrorBody),
        (status = 503, description = "The guest agent is not reachable (guest_unavailable), or hearthd has as many streams open as it takes (overloaded)", body = ErrorBody),
        (status = 504, description = "The guest did not answer in time (guest_timeout)", body = ErrorBody)))]
async fn get_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    params: Result<Query<FileParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(query_rejection)?;
    stream::get_file(&state.service, &caller, name, p.path).await
}

pub(crate) fn octal_header(mode: u32) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("{:o}", mode & 0o7777)) {
        h.insert("x-hearth-file-mode", v);
    }
    h
}

#[cfg(test)]
mod boot_tests;
#[cfg(test)]
mod tests;
