//! `/healthz` (the process answers) and `/readyz` (the store answers and
//! recovery is done: the application serves only after it).

use actix_web::{HttpResponse, web};

use crate::http::AppState;
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
