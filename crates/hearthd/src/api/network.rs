//! Network endpoints: a VM's egress policy and private networks with their members.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_api::{CreateNetworkRequest, EgressRequest, ErrorBody, Network, VmDetail};

use super::{ApiError, AppState, Json, run, unexpected};
use crate::vm::{Action, Caller, Reply};

/// Replace a VM's egress policy; a running VM's slot and DNS forwarder follow at once.
#[utoipa::path(put, path = "/v1/vms/{name}/egress", tag = "network", request_body = EgressRequest,
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = VmDetail),
        (status = 400, description = "A field breaks a rule, naming it (invalid_request), or networking is off", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "Another operation on it is in progress (vm_busy)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "The network helper failed or cannot be reached (network_failed; the new policy is stored and applied at the VM's next start), or hearthd has as many requests in hand as it takes (overloaded)", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
pub(super) async fn set_egress(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(request): Json<EgressRequest>,
) -> Result<axum::Json<VmDetail>, ApiError> {
    match run(&state, &caller, Action::SetEgress { name, request }).await? {
        Reply::VmDetail(d) => Ok(axum::Json(d)),
        other => Err(unexpected(other)),
    }
}

/// List private networks and their members.
#[utoipa::path(get, path = "/v1/networks", tag = "network",
    responses((status = 200, body = [Network]),
        (status = 400, description = "Networking is off on this host (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
pub(super) async fn list_networks(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<Network>>, ApiError> {
    match run(&state, &caller, Action::ListNetworks).await? {
        Reply::Networks(n) => Ok(axum::Json(n)),
        other => Err(unexpected(other)),
    }
}

/// Create a private network: VMs in it reach each other, nothing else reaches them.
#[utoipa::path(post, path = "/v1/networks", tag = "network", request_body = CreateNetworkRequest,
    responses((status = 201, body = Network),
        (status = 400, description = "The name breaks the naming rule or the body is malformed (invalid_request), or networking is off", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 409, description = "A network has that name (network_name_taken)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
pub(super) async fn create_network(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateNetworkRequest>,
) -> Result<(StatusCode, axum::Json<Network>), ApiError> {
    match run(&state, &caller, Action::CreateNetwork(req)).await? {
        Reply::Network(n) => Ok((StatusCode::CREATED, axum::Json(n))),
        other => Err(unexpected(other)),
    }
}

/// Delete a private network that has no members.
#[utoipa::path(delete, path = "/v1/networks/{network}", tag = "network",
    params(("network" = String, Path, description = "Network name")),
    responses((status = 204, description = "Deleted"),
        (status = 400, description = "Networking is off on this host (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No network has that name (network_not_found)", body = ErrorBody),
        (status = 409, description = "The network still has members (network_in_use)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
pub(super) async fn delete_network(
    State(state): State<AppState>,
    caller: Caller,
    Path(network): Path<String>,
) -> Result<StatusCode, ApiError> {
    match run(&state, &caller, Action::DeleteNetwork(network)).await? {
        Reply::Deleted => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected(other)),
    }
}

/// Put a VM in a private network; a running VM reaches the other members at once.
#[utoipa::path(put, path = "/v1/networks/{network}/members/{name}", tag = "network",
    params(("network" = String, Path, description = "Network name"), ("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Network),
        (status = 400, description = "The VM has no network, or networking is off (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM (vm_not_found) or network (network_not_found) has that name", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "The network helper failed or cannot be reached (network_failed; the membership is stored and applied at the next start), or hearthd has as many requests in hand as it takes (overloaded)", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
pub(super) async fn connect(
    State(state): State<AppState>,
    caller: Caller,
    Path((network, vm)): Path<(String, String)>,
) -> Result<axum::Json<Network>, ApiError> {
    membership(state, caller, network, vm, true).await
}

/// Take a VM out of a private network.
#[utoipa::path(delete, path = "/v1/networks/{network}/members/{name}", tag = "network",
    params(("network" = String, Path, description = "Network name"), ("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = Network),
        (status = 400, description = "The VM has no network, or networking is off (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM (vm_not_found) or network (network_not_found) has that name", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "The network helper failed or cannot be reached (network_failed; the change is stored and applied at the next start), or hearthd has as many requests in hand as it takes (overloaded)", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
pub(super) async fn disconnect(
    State(state): State<AppState>,
    caller: Caller,
    Path((network, vm)): Path<(String, String)>,
) -> Result<axum::Json<Network>, ApiError> {
    membership(state, caller, network, vm, false).await
}

async fn membership(
    state: AppState,
    caller: Caller,
    network: String,
    vm: String,
    member: bool,
) -> Result<axum::Json<Network>, ApiError> {
    let action = Action::SetMembership {
        network,
        vm,
        member,
    };
    match run(&state, &caller, action).await? {
        Reply::Network(n) => Ok(axum::Json(n)),
        other => Err(unexpected(other)),
    }
}
