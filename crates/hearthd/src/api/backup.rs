//! Backup endpoints: a stopped VM's root disk copied into a backup of it, listed, deleted, and
//! put back in place of the disk.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_api::{Backup, ErrorBody, RestoreRequest, VmDetail};

use super::{ApiError, AppState, Json, run, unexpected};
use crate::vm::{Action, Caller, Reply};

/// Back up a stopped VM's root disk (a reflink clone where the filesystem allows, else a sparse
/// copy); the backup records the VM's shape and who made it.
#[utoipa::path(post, path = "/v1/vms/{name}/backups", tag = "backups",
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 201, body = Backup),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "Not stopped (invalid_state), or another operation on it is in progress (vm_busy)", body = ErrorBody),
        (status = 500, description = "The copy failed (internal; nothing is left of it); the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody),
        (status = 507, description = "The data directory has not the space the copy needs past capacity.disk_reserve, or filled up during it (resource_exhausted; nothing is left of it)", body = ErrorBody)))]
pub(super) async fn create_backup(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, axum::Json<Backup>), ApiError> {
    match run(&state, &caller, Action::CreateBackup(name)).await? {
        Reply::Backup(b) => Ok((StatusCode::CREATED, axum::Json(b))),
        other => Err(unexpected(other)),
    }
}

/// A VM's backups, oldest first.
#[utoipa::path(get, path = "/v1/vms/{name}/backups", tag = "backups",
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = [Backup]),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout)", body = ErrorBody)))]
pub(super) async fn list_backups(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<Vec<Backup>>, ApiError> {
    match run(&state, &caller, Action::ListBackups(name)).await? {
        Reply::Backups(list) => Ok(axum::Json(list)),
        other => Err(unexpected(other)),
    }
}

/// Delete one of a VM's backups.
#[utoipa::path(delete, path = "/v1/vms/{name}/backups/{backup}", tag = "backups",
    params(("name" = String, Path, description = "VM name or id"),
        ("backup" = String, Path, description = "Backup id")),
    responses((status = 204, description = "Deleted"),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found), or it has no such backup (backup_not_found)", body = ErrorBody),
        (status = 409, description = "Another operation on the VM is in progress (vm_busy)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody)))]
pub(super) async fn delete_backup(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    match run(&state, &caller, Action::DeleteBackup { name, id }).await? {
        Reply::Deleted => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected(other)),
    }
}

/// Put one of a stopped VM's own backups in place of its root disk. The old disk stays whole
/// until the new one is complete; the VM's cpus and memory are kept, its disk size is the
/// backup's.
#[utoipa::path(post, path = "/v1/vms/{name}/restore", tag = "backups", request_body = RestoreRequest,
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, body = VmDetail),
        (status = 400, description = "The body is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found), or it has no such backup (backup_not_found: a backup restores only into the VM it was made of)", body = ErrorBody),
        (status = 409, description = "Not stopped (invalid_state), or another operation on it is in progress (vm_busy)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "The copy failed (internal; the old disk is kept); the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the operation goes on", body = ErrorBody),
        (status = 507, description = "The data directory has not the space the copy needs (resource_exhausted; the old disk is kept)", body = ErrorBody)))]
pub(super) async fn restore(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Json(request): Json<RestoreRequest>,
) -> Result<axum::Json<VmDetail>, ApiError> {
    let action = Action::Restore {
        name,
        backup: request.backup,
    };
    match run(&state, &caller, action).await? {
        Reply::VmDetail(d) => Ok(axum::Json(d)),
        other => Err(unexpected(other)),
    }
}
