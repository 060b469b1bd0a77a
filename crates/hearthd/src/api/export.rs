//! Export and import endpoints: a stopped VM streamed out as a tar archive, and an archive
//! streamed in as a new stopped VM. Neither body is held in memory.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, stream};
use hearth_api::{ErrorBody, VmDetail};

use super::{ApiError, AppState, unexpected};
use crate::vm::{Action, Caller, Reply, Upload};

/// An import whose client sends nothing for this long is abandoned (and nothing is kept).
const IMPORT_IDLE: Duration = Duration::from_secs(60);
/// How long a refused import's body is still read (and dropped) before the answer: a client
/// still sending when the connection closes with its bytes unread gets a reset instead of the
/// answer.
const REFUSED_DRAIN: Duration = Duration::from_secs(30);

/// Stream a stopped VM as a tar archive: `manifest.json` (format version, name, creator,
/// shape), `rootfs.ext4` (sparse), the serial and VMM logs (each its newest 256 MiB) and
/// `checksums.sha256`. `Content-Length` is exact. The VM stays stopped and locked (it cannot
/// start) until the archive is sent or the client goes away.
#[utoipa::path(get, path = "/v1/vms/{name}/export", tag = "backups",
    params(("name" = String, Path, description = "VM name or id")),
    responses((status = 200, content_type = "application/x-tar", body = Vec<u8>),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No VM has that name or id (vm_not_found)", body = ErrorBody),
        (status = 409, description = "Not stopped (invalid_state)", body = ErrorBody),
        (status = 500, description = "Its files cannot be read (internal); the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn export(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let export = match state.service.handle(&caller, Action::Export(name)).await? {
        Reply::Export(e) => e,
        other => return Err(unexpected(other)),
    };
    let disposition = format!("attachment; filename=\"{}.tar\"", export.vm);
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    headers.insert(header::CONTENT_LENGTH, export.len.into());
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    let body = stream::unfold(export, |mut e| async move {
        let item = e.next().await?;
        Some((item, e))
    });
    Ok((headers, Body::from_stream(body)).into_response())
}

/// Make a VM of an export (`application/x-tar`, streamed): it is created stopped, under the
/// archive's name, with this host's paths, network slot, MAC and /30. The manifest is checked
/// before any file is written, every file's size and checksum as it arrives; a refused or cut
/// short archive leaves nothing.
#[utoipa::path(post, path = "/v1/imports", tag = "backups",
    request_body(content = Vec<u8>, content_type = "application/x-tar", description = "An archive made by `GET /v1/vms/{name}/export`"),
    responses((status = 201, body = VmDetail),
        (status = 400, description = "Not an export this server reads, damaged, cut short, a checksum mismatch, or a manifest of a newer version (invalid_archive); the VM it describes breaks a rule (invalid_name, invalid_cpus, invalid_ram, invalid_rootfs_size, invalid_request naming egress, user_data or ssh_authorized_keys); nothing is kept", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 409, description = "A VM has the archive's name (vm_name_taken), or the host has not the disk or addresses left (insufficient_capacity)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details; nothing is kept", body = ErrorBody),
        (status = 503, description = "The guest image is not ready (image_unavailable), or hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 507, description = "The data directory has not the space the archive's files need, or filled up while they were written (resource_exhausted); nothing is kept", body = ErrorBody)))]
pub(super) async fn import(
    State(state): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<(StatusCode, axum::Json<VmDetail>), ApiError> {
    let data = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(|e| format!("reading the request body failed: {e}")));
    let data = stream::unfold(Box::pin(data), |mut data| async move {
        match tokio::time::timeout(IMPORT_IDLE, data.next()).await {
            Ok(Some(item)) => Some((item, data)),
            Ok(None) => None,
            Err(_) => Some((
                Err(format!(
                    "the client sent nothing for {} s",
                    IMPORT_IDLE.as_secs()
                )),
                data,
            )),
        }
    });
    // The body reaches the import through a channel, so what the import leaves unread (it
    // stops at a refusal) can still be drained before the answer.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, String>>(8);
    let forward = tokio::spawn(async move {
        let mut data = Box::pin(data.fuse());
        while let Some(item) = data.next().await {
            if tx.send(item).await.is_err() {
                break;
            }
        }
        data
    });
    let chunks = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let action = Action::Import(Upload(Box::pin(chunks)));
    let result = state.service.handle(&caller, action).await;
    if result.is_err()
        && let Ok(mut rest) = forward.await
    {
        let _ = tokio::time::timeout(REFUSED_DRAIN, async {
            while let Some(Ok(_)) = rest.next().await {}
        })
        .await;
    }
    match result? {
        Reply::Created(d) => Ok((StatusCode::CREATED, axum::Json(d))),
        other => Err(unexpected(other)),
    }
}
