//! Authentication of REST requests: `Authorization: Bearer <key>` becomes the request's
//! [`Caller`]; without a key, a local caller is the operator when `auth.localhost_admin` is on,
//! and anyone else gets 401. Failed logins are audited and rate-limited per address. Whether the
//! caller may do what it asks is not decided here but in `vm::access`, for every front end.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hearth_api::ErrorCode;

use super::{ApiError, AppState, guard};
use crate::vm::{Caller, Principal, Source, VmError};

/// Paths anyone may read: the API's description.
const PUBLIC: &[&str] = &["/", "/docs", "/openapi.json"];

/// The client's `x-request-id` when it is a sane token, else a new one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(|| Caller::system().request_id, str::to_owned)
}

fn unauthenticated(e: VmError) -> Response {
    let mut resp = ApiError::from(e).into_response();
    if resp.status() == axum::http::StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"hearth\""),
        );
    }
    resp
}

pub(super) async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    if PUBLIC.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    // Requests that came through no listener (tests, in-process calls) are internal.
    let source = req
        .extensions()
        .get::<ConnectInfo<guard::ConnInfo>>()
        .map_or(Source::Internal, |info| info.0.source.clone());
    let request_id = request_id(&req);
    let access = state.service.access();
    // A local caller without a key is the operator anyway: only others wait out a limit.
    let keyless_local =
        !req.headers().contains_key(header::AUTHORIZATION) && access.is_local_admin(&source);
    if !keyless_local && let Err(e) = access.check_rate(source.ip()) {
        return ApiError::from(e).into_response();
    }
    let what = Some(format!("{} {}", req.method(), req.uri().path()));
    let key = match req.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(value) => match value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
            Some(key) => Some(key.trim().to_owned()),
            None => {
                let e = VmError::access(
                    ErrorCode::Unauthenticated,
                    "the Authorization header must be `Bearer <api key>`",
                );
                access.failed(source.ip());
                access
                    .refused(&source, "login", what, e.code(), &request_id)
                    .await;
                return unauthenticated(e);
            }
        },
    };
    let (principal, source) = match key {
        Some(key) => match access.authenticate(&key).await {
            Ok((identity, ssh)) => (Principal::User(Arc::new(identity)), ssh.unwrap_or(source)),
            Err(e) => {
                access.failed(source.ip());
                access
                    .refused(&source, "login", what, e.code(), &request_id)
                    .await;
                return unauthenticated(e);
            }
        },
        None if access.is_local_admin(&source) => (Principal::Operator, source),
        None => {
            let e = VmError::access(
                ErrorCode::Unauthenticated,
                "this API needs `Authorization: Bearer <api key>`: an admin makes one with `hearth key create --user NAME`, and `hearth login` keeps it",
            );
            access
                .refused(&source, "login", what, e.code(), &request_id)
                .await;
            return unauthenticated(e);
        }
    };
    req.extensions_mut().insert(Caller {
        principal,
        source,
        request_id,
    });
    next.run(req).await
}

/// The caller [`authenticate`] found for the request.
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Internal,
                "the request reached a handler without being authenticated",
            )
        })
    }
}
