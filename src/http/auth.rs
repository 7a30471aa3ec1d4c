//! The one authorization point of every `/admin/t/{tenant}/…` route: the
//! [`authorize`] middleware on that scope, so a route added there later is
//! covered too. It answers 401 (no, malformed, unknown or revoked token)
//! before anything else, then 400 `invalid_tenant`, then 403 (the token does
//! not reach that tenant), before any handler looks at the run type, the run
//! id or the body; so a 403 reveals nothing about the tenant's runs.

use std::future::{Ready, ready};

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};

use super::error::ApiError;
use crate::access::AccessControl;
use crate::domain::TenantId;

/// The tenant named by the path, reached by the request's token; put in
/// the request by [`authorize`].
#[derive(Debug, Clone)]
pub struct TenantAccess(pub TenantId);

/// The token of an `Authorization: Bearer …` header (the scheme's case is free).
pub(crate) fn bearer_token(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// Checks the token and the tenant of a tenant-scoped request.
pub async fn authorize(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let access = req
        .app_data::<web::Data<AccessControl>>()
        .cloned()
        .ok_or_else(|| ApiError::internal(&NotWired("access control")))?;
    let token = bearer_token(req.request()).ok_or(ApiError::Unauthenticated)?;
    let scope = access
        .scope_of(&token)
        .await
        .map_err(|e| {
            if e.is_unavailable() {
                ApiError::StoreUnavailable
            } else {
                ApiError::internal(&e)
            }
        })?
        .ok_or(ApiError::Unauthenticated)?;
    let raw = req.match_info().get("tenant").unwrap_or_default();
    let tenant = TenantId::parse(raw).map_err(|e| ApiError::InvalidTenant(e.0))?;
    if !scope.reaches(&tenant) {
        return Err(ApiError::Forbidden.into());
    }
    req.extensions_mut().insert(TenantAccess(tenant));
    next.call(req).await
}

impl FromRequest for TenantAccess {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<TenantAccess>()
                .cloned()
                .ok_or_else(|| ApiError::internal(&NotWired("the authorize middleware"))),
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0} is not registered for this route")]
struct NotWired(&'static str);
