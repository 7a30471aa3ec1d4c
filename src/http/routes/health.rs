//! `/healthz` (the process answers), `/readyz` (the store answers and
//! recovery is done: the application serves only after it) and `/metrics`.

use actix_web::{HttpRequest, HttpResponse, web};

use crate::access::AccessControl;
use crate::domain::TokenScope;
use crate::http::AppState;
use crate::http::auth::bearer_token;
use crate::http::error::ApiError;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if state.directory.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    state
        .directory
        .check_store()
        .await
        .map_err(|_| ApiError::StoreUnavailable)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
}

/// Prometheus text; with `server.metrics_require_token`, only for a token
/// that reaches every tenant.
pub async fn metrics(
    req: HttpRequest,
    state: web::Data<AppState>,
    access: web::Data<AccessControl>,
) -> Result<HttpResponse, ApiError> {
    if state.config.server.metrics_require_token {
        let token = bearer_token(&req).ok_or(ApiError::Unauthenticated)?;
        match access.scope_of(&token).await {
            Ok(Some(TokenScope::AllTenants)) => {}
            Ok(Some(TokenScope::Tenants(_))) => return Err(ApiError::Forbidden),
            Ok(None) => return Err(ApiError::Unauthenticated),
            Err(e) if e.is_unavailable() => return Err(ApiError::StoreUnavailable),
            Err(e) => return Err(ApiError::internal(&e)),
        }
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::telemetry::metrics().render()))
}
