//! Endpoints of identities: who am I, users and their SSH keys, API keys, organizations and
//! their members, and the audit log.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use hearth_api::{
    AddMemberRequest, AddSshKeyRequest, ApiKey, AuditEntry, CreateApiKeyRequest, CreateOrgRequest,
    CreateUserRequest, CreatedApiKey, ErrorBody, Org, SshKey, SwitchOrgRequest, User, Whoami,
};
use serde::Deserialize;

use super::{ApiError, AppState, Json, query_rejection, run, unexpected};
use crate::store::access::AuditFilter;
use crate::vm::{Action, Caller, Reply};

async fn deleted(
    state: &AppState,
    caller: &Caller,
    action: Action,
) -> Result<StatusCode, ApiError> {
    match run(state, caller, action).await? {
        Reply::Deleted => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected(other)),
    }
}

/// Who the caller is: user, host admin or not, the organization it acts in and its others.
#[utoipa::path(get, path = "/v1/whoami", tag = "access",
    responses((status = 200, body = Whoami),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn whoami(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Whoami>, ApiError> {
    match run(&state, &caller, Action::Whoami).await? {
        Reply::Whoami(w) => Ok(axum::Json(w)),
        other => Err(unexpected(other)),
    }
}

/// Act in another of the caller's organizations (its SSH sessions and session keys follow; an
/// API key acts in the organization it was made for only).
#[utoipa::path(put, path = "/v1/whoami/org", tag = "access", request_body = SwitchOrgRequest,
    responses((status = 200, body = Whoami),
        (status = 400, description = "The body is malformed, the caller is not a user, or its API key is for another organization (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "The caller belongs to no such organization (org_not_found)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn switch_org(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<SwitchOrgRequest>,
) -> Result<axum::Json<Whoami>, ApiError> {
    match run(&state, &caller, Action::SwitchOrg(req.org)).await? {
        Reply::Whoami(w) => Ok(axum::Json(w)),
        other => Err(unexpected(other)),
    }
}

/// Every user (host admins only).
#[utoipa::path(get, path = "/v1/users", tag = "access",
    responses((status = 200, body = [User]),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the caller is no host admin (permission_denied)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn list_users(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<User>>, ApiError> {
    match run(&state, &caller, Action::ListUsers).await? {
        Reply::Users(u) => Ok(axum::Json(u)),
        other => Err(unexpected(other)),
    }
}

/// Make a user (host admins only): in a new organization of its own, or in `org`.
#[utoipa::path(post, path = "/v1/users", tag = "access", request_body = CreateUserRequest,
    responses((status = 201, body = User),
        (status = 400, description = "The name breaks the rule (invalid_name), or the body or SSH key is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the caller is no host admin (permission_denied)", body = ErrorBody),
        (status = 404, description = "No such organization (org_not_found)", body = ErrorBody),
        (status = 409, description = "A user or organization has the name, or the SSH key is another user's (name_taken)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateUserRequest>,
) -> Result<(StatusCode, axum::Json<User>), ApiError> {
    match run(&state, &caller, Action::CreateUser(req)).await? {
        Reply::User(u) => Ok((StatusCode::CREATED, axum::Json(u))),
        other => Err(unexpected(other)),
    }
}

/// Delete a user with its SSH keys, API keys and memberships (host admins only); its VMs stay
/// with their organizations.
#[utoipa::path(delete, path = "/v1/users/{user}", tag = "access",
    params(("user" = String, Path, description = "User name")),
    responses((status = 204, description = "Deleted"),
        (status = 400, description = "A user cannot delete itself (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the caller is no host admin (permission_denied)", body = ErrorBody),
        (status = 404, description = "No such user (user_not_found)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn delete_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    deleted(&state, &caller, Action::DeleteUser(user)).await
}

/// A user's SSH public keys (the user itself, or a host admin).
#[utoipa::path(get, path = "/v1/users/{user}/ssh-keys", tag = "access",
    params(("user" = String, Path, description = "User name")),
    responses((status = 200, body = [SshKey]),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No such user the caller may see (user_not_found)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn list_ssh_keys(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<axum::Json<Vec<SshKey>>, ApiError> {
    match run(&state, &caller, Action::ListSshKeys(user)).await? {
        Reply::SshKeys(k) => Ok(axum::Json(k)),
        other => Err(unexpected(other)),
    }
}

/// Add an SSH public key to a user (the user itself, or a host admin): it logs in to the SSH
/// command surface and into the user's VMs.
#[utoipa::path(post, path = "/v1/users/{user}/ssh-keys", tag = "access", request_body = AddSshKeyRequest,
    params(("user" = String, Path, description = "User name")),
    responses((status = 201, body = SshKey),
        (status = 400, description = "The key is not an OpenSSH public key, or the body is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No such user the caller may see (user_not_found)", body = ErrorBody),
        (status = 409, description = "The key is added already (name_taken)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn add_ssh_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    Json(req): Json<AddSshKeyRequest>,
) -> Result<(StatusCode, axum::Json<SshKey>), ApiError> {
    let action = Action::AddSshKey {
        user,
        public_key: req.public_key,
    };
    match run(&state, &caller, action).await? {
        Reply::SshKey(k) => Ok((StatusCode::CREATED, axum::Json(k))),
        other => Err(unexpected(other)),
    }
}

/// Remove one of a user's SSH keys (the user itself, or a host admin).
#[utoipa::path(delete, path = "/v1/users/{user}/ssh-keys/{fingerprint}", tag = "access",
    params(("user" = String, Path, description = "User name"),
        ("fingerprint" = String, Path, description = "`SHA256:…`, percent-encoded")),
    responses((status = 204, description = "Removed"),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No such user the caller may see (user_not_found), or it has no such key (key_not_found)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn remove_ssh_key(
    State(state): State<AppState>,
    caller: Caller,
    Path((user, fingerprint)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    deleted(&state, &caller, Action::RemoveSshKey { user, fingerprint }).await
}

/// The caller's API keys (every user's, for a host admin). Secrets are never shown again.
#[utoipa::path(get, path = "/v1/api-keys", tag = "access",
    responses((status = 200, body = [ApiKey]),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn list_api_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<ApiKey>>, ApiError> {
    match run(&state, &caller, Action::ListApiKeys).await? {
        Reply::ApiKeys(k) => Ok(axum::Json(k)),
        other => Err(unexpected(other)),
    }
}

/// Make an API key acting in one organization; the answer holds the key, shown this once
/// (only its SHA-256 is kept).
#[utoipa::path(post, path = "/v1/api-keys", tag = "access", request_body = CreateApiKeyRequest,
    responses((status = 201, body = CreatedApiKey),
        (status = 400, description = "The name is not 1-64 printable characters, the operator named no user, or the body is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the user belongs to no organization (permission_denied)", body = ErrorBody),
        (status = 404, description = "No such user the caller may see (user_not_found), or the user is not in that organization (org_not_found)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn create_api_key(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateApiKeyRequest>,
) -> Result<(StatusCode, axum::Json<CreatedApiKey>), ApiError> {
    match run(&state, &caller, Action::CreateApiKey(req)).await? {
        Reply::CreatedApiKey(k) => Ok((StatusCode::CREATED, axum::Json(k))),
        other => Err(unexpected(other)),
    }
}

/// Revoke an API key: the next request with it gets 401.
#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "access",
    params(("id" = String, Path, description = "The key's id")),
    responses((status = 204, description = "Revoked"),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 404, description = "No such key of the caller's (key_not_found)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn revoke_api_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    deleted(&state, &caller, Action::RevokeApiKey(id)).await
}

/// The caller's organizations with their members (all, for a host admin).
#[utoipa::path(get, path = "/v1/orgs", tag = "access",
    responses((status = 200, body = [Org]),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn list_orgs(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<Vec<Org>>, ApiError> {
    match run(&state, &caller, Action::ListOrgs).await? {
        Reply::Orgs(o) => Ok(axum::Json(o)),
        other => Err(unexpected(other)),
    }
}

/// Make an organization; the caller is its owner.
#[utoipa::path(post, path = "/v1/orgs", tag = "access", request_body = CreateOrgRequest,
    responses((status = 201, body = Org),
        (status = 400, description = "The name breaks the rule (invalid_name), the caller is not a user, or the body is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin)", body = ErrorBody),
        (status = 409, description = "An organization has the name (name_taken)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn create_org(
    State(state): State<AppState>,
    caller: Caller,
    Json(req): Json<CreateOrgRequest>,
) -> Result<(StatusCode, axum::Json<Org>), ApiError> {
    match run(&state, &caller, Action::CreateOrg(req.name)).await? {
        Reply::Org(o) => Ok((StatusCode::CREATED, axum::Json(o))),
        other => Err(unexpected(other)),
    }
}

/// Put a user in an organization, or change its role there (its owners, or a host admin).
#[utoipa::path(post, path = "/v1/orgs/{org}/members", tag = "access", request_body = AddMemberRequest,
    params(("org" = String, Path, description = "Organization name")),
    responses((status = 200, body = Org),
        (status = 400, description = "The body is malformed (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the caller is no owner of it (permission_denied)", body = ErrorBody),
        (status = 404, description = "No such organization of the caller's (org_not_found) or no such user (user_not_found)", body = ErrorBody),
        (status = 413, description = "The body is larger than server.max_json_body_bytes (request_too_large)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    Json(req): Json<AddMemberRequest>,
) -> Result<axum::Json<Org>, ApiError> {
    let action = Action::SetMember {
        org,
        user: req.user,
        role: req.role,
    };
    match run(&state, &caller, action).await? {
        Reply::Org(o) => Ok(axum::Json(o)),
        other => Err(unexpected(other)),
    }
}

/// Take a user out of an organization, with the API keys it made for it (its owners, or a host
/// admin).
#[utoipa::path(delete, path = "/v1/orgs/{org}/members/{user}", tag = "access",
    params(("org" = String, Path, description = "Organization name"), ("user" = String, Path, description = "User name")),
    responses((status = 200, body = Org),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the caller is no owner of it (permission_denied)", body = ErrorBody),
        (status = 404, description = "No such organization of the caller's (org_not_found), or the user is no member (user_not_found)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, user)): Path<(String, String)>,
) -> Result<axum::Json<Org>, ApiError> {
    match run(&state, &caller, Action::RemoveMember { org, user }).await? {
        Reply::Org(o) => Ok(axum::Json(o)),
        other => Err(unexpected(other)),
    }
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditQuery {
    /// Only this principal's rows (a user name, `operator`, `anonymous`).
    principal: Option<String>,
    /// Only rows of this organization.
    org: Option<String>,
    /// Only this action (`create_vm`, `login`, `ssh_command`, …).
    action: Option<String>,
    /// Only rows naming this VM, network, volume, user or command.
    target: Option<String>,
    /// `allow` or `deny`.
    decision: Option<String>,
    /// RFC 3339: rows at or after it.
    since: Option<String>,
    /// At most this many rows, newest first (1-1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// The audit log, newest first (host admins only): every command and authorization decision.
#[utoipa::path(get, path = "/v1/audit", tag = "access", params(AuditQuery),
    responses((status = 200, body = [AuditEntry]),
        (status = 400, description = "A query parameter breaks its rule (invalid_request)", body = ErrorBody),
        (status = 403, description = "The Host or Origin is not allowed (forbidden_host, forbidden_origin), or the caller is no host admin (permission_denied)", body = ErrorBody),
        (status = 500, description = "internal; the server log has details", body = ErrorBody),
        (status = 503, description = "hearthd has as many requests in hand as it takes (overloaded); try again", body = ErrorBody)))]
pub(super) async fn audit(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Vec<AuditEntry>>, ApiError> {
    let Query(q) = query.map_err(query_rejection)?;
    let bad = |m: String| ApiError::new(hearth_api::ErrorCode::InvalidRequest, m);
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(bad(format!("limit {limit} must be 1-1000")));
    }
    if let Some(d) = &q.decision
        && d != "allow"
        && d != "deny"
    {
        return Err(bad(format!("decision {d:?} must be allow or deny")));
    }
    // Stored times are UTC with milliseconds, so they compare as text once `since` is too.
    let since = match &q.since {
        None => None,
        Some(since) => Some(
            time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
                .map(crate::store::format_time)
                .map_err(|_| {
                    bad(format!(
                        "since {since:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z"
                    ))
                })?,
        ),
    };
    let filter = AuditFilter {
        principal: q.principal,
        org: q.org,
        action: q.action,
        target: q.target,
        decision: q.decision,
        since,
        limit,
    };
    match run(&state, &caller, Action::Audit(filter)).await? {
        Reply::Audit(a) => Ok(axum::Json(a)),
        other => Err(unexpected(other)),
    }
}
