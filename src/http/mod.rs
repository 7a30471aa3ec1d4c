//! The HTTP API (actix-web). Handlers parse and check the request, send one
//! message through the runtime's [`Directory`], and render the answer; they
//! never touch the store.

pub mod auth;
pub mod dto;
pub mod error;
mod routes;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{Next, from_fn};
use actix_web::{HttpResponse, web};
use futures_util::FutureExt;

use crate::access::AccessControl;
use crate::config::Config;
use crate::runtime::Directory;
use error::ApiError;

/// What every handler may reach.
pub struct AppState {
    pub directory: Directory,
    pub config: Arc<Config>,
}

/// Registers the routes and the shared state on an app.
pub fn configure(
    state: web::Data<AppState>,
    access: web::Data<AccessControl>,
) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(state)
            .app_data(access)
            .service(
                web::scope("/admin/t/{tenant}")
                    .wrap(from_fn(auth::authorize))
                    .service(
                        web::resource("/runs")
                            .route(web::get().to(routes::runs::list_runs))
                            .default_service(web::to(method_not_allowed)),
                    )
                    .service(
                        web::resource("/runs/{run_type}")
                            .route(web::post().to(routes::runs::start_run))
                            .default_service(web::to(method_not_allowed)),
                    )
                    .service(
                        web::resource("/runs/{run_type}/{run_id}")
                            .route(web::get().to(routes::runs::get_run))
                            .default_service(web::to(method_not_allowed)),
                    )
                    .service(
                        web::resource("/runs/{run_type}/{run_id}/items")
                            .route(web::get().to(routes::items::list_items))
                            .default_service(web::to(method_not_allowed)),
                    )
                    .service(
                        web::resource("/runs/{run_type}/{run_id}/cancel")
                            .route(web::post().to(routes::runs::cancel_run))
                            .default_service(web::to(method_not_allowed)),
                    )
                    .default_service(web::to(not_found)),
            )
            .service(
                web::resource("/healthz")
                    .route(web::get().to(routes::health::healthz))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/metrics")
                    .route(web::get().to(routes::health::metrics))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/readyz")
                    .route(web::get().to(routes::health::readyz))
                    .default_service(web::to(method_not_allowed)),
            )
            .default_service(web::to(not_found));
    }
}

/// Turns a panic anywhere below into a 500 `internal` answer with a
/// correlation id; the worker goes on serving.
pub async fn catch_panics(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse, actix_web::Error> {
    // The request must not be cloned here: routing needs it unshared. An
    // error returned from here is rendered by `ApiError`'s ResponseError.
    match AssertUnwindSafe(next.call(req)).catch_unwind().await {
        Ok(result) => result.map(ServiceResponse::map_into_boxed_body),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            Err(ApiError::internal(&Panicked(message)).into())
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {0}")]
struct Panicked(String);

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}
