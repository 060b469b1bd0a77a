//! Volume endpoints: named extra disks made, listed and deleted on their own, and attached to
//! and detached from stopped VMs.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_api::{AttachVolumeRequest, CreateVolumeRequest, ErrorBody, VmDetail, Volume};

use super::{ApiError, AppState, Json, run, unexpected};
use crate::vm::{Action, Caller, Reply};

/// Make a volume: a sparse file of the given size, formatted ext4 at its first attach.
#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", request_body = CreateVolumeRequest,
    responses((status = 201, body = Volume),
        (status = 400, description = "A field breaks a rule (invalid_name; invalid_size: under 16 MiB or over volumes.max_size), or the body is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 409, description = "The name is taken (volume_name_taken)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "The file could not be made (internal; nothing is left of it); the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody),
        (status = 507, description = "The volume, filled, would leave less than volumes.min_free_disk free on the data directory's filesystem (resource_exhausted; nothing is made)", body = ErrorBody)))]
pub(super) async fn create_volume(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<CreateVolumeRequest>,
) -> Result<(StatusCode, axum::Json<Volume>), ApiError> {
    match run(&state, &caller, Action::CreateVolume(request)).await? {
        Reply::Volume(v) => Ok((StatusCode::CREATED, axum::Json(v))),
        other => Err(unexpected(other)),
    }
}

/// Every volume, by name, with the VM it is attached to.
#[utoipa::path(get, path = "/v1/volumes", tag = "volumes",
    responses((status = 200, body = [Volume]),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout)", body = ErrorBody)))]
pub(super) async fn list_volumes(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<Volume>>, ApiError> {
    match run(&state, &caller, Action::ListVolumes).await? {
        Reply::Volumes(list) => Ok(axum::Json(list)),
        other => Err(unexpected(other)),
    }
}

/// Delete a volume and its data. Refused while it is attached to a VM.
#[utoipa::path(delete, path = "/v1/volumes/{volume}", tag = "volumes",
    params(("volume" = String, Path, description = "Volume name")),
    responses((status = 204, description = "Deleted"),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No volume has that name (volume_not_found)", body = ErrorBody),
        (status = 409, description = "It is attached to a VM, which the message names (volume_in_use): detach it first", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
pub(super) async fn delete_volume(
    State(state): State<AppState>,
    caller: Caller,
    Path(volume): Path<String>,
) -> Result<StatusCode, ApiError> {
    match run(&state, &caller, Action::DeleteVolume(volume)).await? {
        Reply::Deleted => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected(other)),
    }
}

/// Attach a volume to a stopped VM, mounted at `path` in the guest from its next boot (the
/// volume is formatted ext4 first, at its first attach). Attaching it again to the same VM
/// moves its mount path.
#[utoipa::path(put, path = "/v1/vms/{name}/volumes/{volume}", tag = "volumes", request_body = AttachVolumeRequest,
    params(("name" = String, Path, description = "VM name or id"),
        ("volume" = String, Path, description = "Volume name")),
    responses((status = 200, body = VmDetail),
        (status = 400, description = "The path breaks the mount path rule or another volume of the VM is mounted there (invalid_path), the volume name breaks the naming rule (invalid_name), the VM has 8 volumes already (invalid_request), or the body is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found), or no volume that name (volume_not_found)", body = ErrorBody),
        (status = 409, description = "The VM is not stopped (invalid_state), the volume is attached to another VM, which the message names (volume_in_use), or another operation on the VM is in progress (vm_busy)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "The volume could not be formatted (internal); the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody),
        (status = 507, description = "The data filesystem filled up while the volume was formatted (resource_exhausted)", body = ErrorBody)))]
pub(super) async fn attach_volume(
    State(state): State<AppState>,
    caller: Caller,
    Path((vm, volume)): Path<(String, String)>,
    Json(request): Json<AttachVolumeRequest>,
) -> Result<axum::Json<VmDetail>, ApiError> {
    let action = Action::AttachVolume {
        vm,
        volume,
        path: request.path,
    };
    match run(&state, &caller, action).await? {
        Reply::VmDetail(d) => Ok(axum::Json(d)),
        other => Err(unexpected(other)),
    }
}

/// Detach a volume from a stopped VM; the volume and its data are kept.
#[utoipa::path(delete, path = "/v1/vms/{name}/volumes/{volume}", tag = "volumes",
    params(("name" = String, Path, description = "VM name or id"),
        ("volume" = String, Path, description = "Volume name")),
    responses((status = 200, body = VmDetail),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found), or the VM has no such volume attached (volume_not_found)", body = ErrorBody),
        (status = 409, description = "The VM is not stopped (invalid_state), or another operation on it is in progress (vm_busy)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
pub(super) async fn detach_volume(
    State(state): State<AppState>,
    caller: Caller,
    Path((vm, volume)): Path<(String, String)>,
) -> Result<axum::Json<VmDetail>, ApiError> {
    match run(&state, &caller, Action::DetachVolume { vm, volume }).await? {
        Reply::VmDetail(d) => Ok(axum::Json(d)),
        other => Err(unexpected(other)),
    }
}
