//! The one authorization point of every `/admin/t/{tenant}/…` route: the
//! [`TenantAccess`] extractor. It answers 401 (no or bad token) before
//! anything else, then 400 `invalid_tenant`, then 403 (the token does not
//! reach that tenant), before the handler looks at the run type, the run
//! id or the body, so a 403 reveals nothing about the tenant.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::domain::TenantId;

/// Who may call the API.
pub struct Authenticator {
    /// SHA-256 of the configured admin token (every tenant), if any.
    admin_token_hash: Option<[u8; 32]>,
}

/// What a valid token may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    AllTenants,
}

impl Scope {
    fn reaches(&self, _tenant: &TenantId) -> bool {
        match self {
            Scope::AllTenants => true,
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Authenticator {
    pub fn new(admin_token: &str) -> Self {
        Self {
            admin_token_hash: (!admin_token.is_empty()).then(|| sha256(admin_token.as_bytes())),
        }
    }

    /// The scope of the request's bearer token; 401 when it has none.
    async fn scope_of(&self, req: &HttpRequest) -> Result<Scope, ApiError> {
        let token = bearer_token(req).ok_or(ApiError::Unauthenticated)?;
        let presented = sha256(token.as_bytes());
        if let Some(admin) = &self.admin_token_hash
            && bool::from(admin.ct_eq(&presented))
        {
            return Ok(Scope::AllTenants);
        }
        Err(ApiError::Unauthenticated)
    }
}

/// The token of an `Authorization: Bearer …` header (the scheme's case is free).
fn bearer_token(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The tenant named by the path, reached by the request's token.
#[derive(Debug, Clone)]
pub struct TenantAccess(pub TenantId);

impl FromRequest for TenantAccess {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let auth = req
                .app_data::<web::Data<Arc<Authenticator>>>()
                .ok_or_else(|| ApiError::internal(&MissingAuthenticator))?;
            let scope = auth.scope_of(&req).await?;
            let raw = req.match_info().get("tenant").unwrap_or_default();
            let tenant = TenantId::parse(raw).map_err(|e| ApiError::InvalidTenant(e.0))?;
            if !scope.reaches(&tenant) {
                return Err(ApiError::Forbidden);
            }
            Ok(TenantAccess(tenant))
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the authenticator is not registered with the app")]
struct MissingAuthenticator;
