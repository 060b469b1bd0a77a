//! Endpoints of secrets: set, list (names and history, never values), delete, and the master
//! key's rotation. Each acts on the organization the caller acts in.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hearth_api::{ErrorBody, ErrorCode, RotatedMasterKey, SecretInfo, SetSecretRequest};

use super::{ApiError, AppState, json_rejection, run, unexpected};
use crate::secrets::Secret;
use crate::vm::{Action, Caller, Reply};

/// Set a secret of the organization the caller acts in (its owners, or a host admin): stored
/// encrypted, never shown again. 201 when it is new, 200 when its value was replaced.
#[utoipa::path(put, path = "/v1/secrets/{secret}", tag = "secrets", request_body = SetSecretRequest,
    params(("secret" = String, Path, description = "Secret name: 1-64 characters, uppercase letters, digits and `_`, starting with a letter (`^[A-Z][A-Z0-9_]{0,63}$`)")),
    responses((status = 200, description = "Replaced", body = SecretInfo),
        (status = 201, description = "Created", body = SecretInfo),
        (status = 400, description = "The name breaks the rule (invalid_name), the value is empty or over 65536 bytes, or the body is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the caller is no owner of the organization it acts in, or acts in none (permission_denied)", body = ErrorBody),
        (status = 404, description = "The organization the caller acts in is gone (org_not_found)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout)", body = ErrorBody)))]
pub(super) async fn set_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<axum::Json<SetSecretRequest>, JsonRejection>,
) -> Result<(StatusCode, axum::Json<SecretInfo>), ApiError> {
    // serde's explanation of a bad body can quote what was sent (`invalid type: integer
    // `1234`…`), which may be the value: it is not repeated.
    let axum::Json(req) = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => json_rejection(r),
        _ => ApiError::new(
            ErrorCode::InvalidRequest,
            "invalid request body: a secret is set with {\"value\": \"...\"}, a JSON object holding one string and nothing else",
        ),
    })?;
    let action = Action::SetSecret {
        name,
        value: Secret::new(req.value),
    };
    match run(&state, &caller, action).await? {
        Reply::Secret { info, created } => Ok((
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            axum::Json(info),
        )),
        other => Err(unexpected(other)),
    }
}

/// The secrets of the organization the caller acts in (its members): names, who made them and
/// when, never values.
#[utoipa::path(get, path = "/v1/secrets", tag = "secrets",
    responses((status = 200, body = [SecretInfo]),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the caller acts in no organization (permission_denied)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout)", body = ErrorBody)))]
pub(super) async fn list_secrets(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<SecretInfo>>, ApiError> {
    match run(&state, &caller, Action::ListSecrets).await? {
        Reply::Secrets(s) => Ok(axum::Json(s)),
        other => Err(unexpected(other)),
    }
}

/// Delete a secret of the organization the caller acts in (its owners, or a host admin).
#[utoipa::path(delete, path = "/v1/secrets/{secret}", tag = "secrets",
    params(("secret" = String, Path, description = "Secret name")),
    responses((status = 204, description = "Deleted"),
        (status = 400, description = "The name breaks the rule (invalid_name)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the caller is no owner of the organization it acts in, or acts in none (permission_denied)", body = ErrorBody),
        (status = 404, description = "The organization the caller acts in has no such secret (secret_not_found)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout)", body = ErrorBody)))]
pub(super) async fn delete_secret(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    match run(&state, &caller, Action::DeleteSecret(name)).await? {
        Reply::Deleted => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected(other)),
    }
}

/// A new master key (host admins): every secret of the host re-encrypted under it in one
/// transaction, then the key file replaced; the old key decrypts nothing afterwards.
#[utoipa::path(post, path = "/v1/secrets/rotate-master-key", tag = "secrets",
    responses((status = 200, body = RotatedMasterKey),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the caller is no host admin (permission_denied)", body = ErrorBody),
        (status = 500, description = "A secret does not decrypt (nothing changed), the key file cannot be written, or internal; the message and the server log have details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody),
        (status = 504, description = "The request took longer than server.request_timeout_secs (operation_timeout); the rotation goes on", body = ErrorBody)))]
pub(super) async fn rotate_master_key(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<RotatedMasterKey>, ApiError> {
    match run(&state, &caller, Action::RotateMasterKey).await? {
        Reply::MasterKeyRotated(r) => Ok(axum::Json(r)),
        other => Err(unexpected(other)),
    }
}
